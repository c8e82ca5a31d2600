"""TLS and mutual TLS on both listeners, through the clients users have: curl with --cacert,
requests, tritonclient's HTTP client with ssl=True and its gRPC client on a secure channel.
Certificates are made here with Debian's openssl: a CA, a server certificate for localhost and
127.0.0.1, a client certificate from the CA, one from a stranger's CA, an expired one."""
import base64
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import Server, metric

ROOT = pathlib.Path(__file__).resolve().parents[2]
CAT = (ROOT / "assets" / "samples" / "chelsea.jpg").read_bytes()
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30", "-subj", f"/CN={name}", cwd=folder)


def issue(folder, ca, name, *, days, server):
    """A certificate `name`.pem / `name`.key signed by `ca`, for localhost (server) or a client."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    (folder / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" if server
                                        else "extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", str(days), "-extfile", f"{name}.ext", cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    make_ca(folder, "ca")
    make_ca(folder, "stranger_ca")
    found = {"ca": folder / "ca.pem", "folder": folder}
    found["server"] = issue(folder, "ca", "server", days=20, server=True)
    found["renewed"] = issue(folder, "ca", "renewed", days=25, server=True)
    found["expired"] = issue(folder, "ca", "expired", days=-1, server=True)
    found["client"] = issue(folder, "ca", "client", days=20, server=False)
    found["stranger"] = issue(folder, "stranger_ca", "stranger", days=20, server=False)
    return found


def start(certs, *, mutual, cert=None):
    folder = certs["folder"]
    served = folder / ("served-mutual" if mutual else "served")
    served.mkdir(exist_ok=True)
    cert_file, key_file = cert or certs["server"]
    (served / "cert.pem").write_bytes(cert_file.read_bytes())
    (served / "key.pem").write_bytes(key_file.read_bytes())
    args = ["--models", "mobilenet_v2", "--tls-cert", str(served / "cert.pem"), "--tls-key", str(served / "key.pem")]
    if mutual:
        args += ["--tls-client-ca", str(certs["ca"])]
    server = Server(os.environ["VISIONSERVE_DEFAULT_MODELS"], extra_args=args, verify=str(certs["ca"]),
                    cert=tuple(map(str, certs["client"])) if mutual else None)
    server.served = served
    return server


@pytest.fixture(scope="module")
def tls_server(certs):
    server = start(certs, mutual=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(certs):
    server = start(certs, mutual=True)
    yield server
    server.stop()


def port_of(server):
    return server.base.rsplit(":", 1)[1]


def test_rest_over_tls_with_curl_and_requests(tls_server, certs):
    assert tls_server.base.startswith("https://")
    out = subprocess.run(["curl", "-sS", "--fail", "--cacert", str(certs["ca"]), tls_server.url("/health/ready")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and '"ready"' in out.stdout, out.stderr
    # By name as well as by address: the certificate holds both.
    out = subprocess.run(["curl", "-sS", "--fail", "--cacert", str(certs["ca"]), "--data-binary", "@" + str(ROOT / "assets/samples/chelsea.jpg"),
                          f"https://localhost:{port_of(tls_server)}/v1/models/mobilenet_v2/predict"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # Unverified: curl refuses a certificate whose CA it was not given.
    out = subprocess.run(["curl", "-sS", tls_server.url("/health/live")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 60, (out.returncode, out.stderr)
    answer = requests.post(tls_server.url("/v1/models/mobilenet_v2/predict"), data=CAT, verify=str(certs["ca"]), timeout=60)
    assert answer.status_code == 200 and answer.json()["results"][0]["predictions"][0]["index"] in CAT_CLASSES


def test_plain_http_on_the_tls_port_is_told_so(tls_server):
    answer = requests.get(tls_server.base.replace("https://", "http://") + "/v1/models", timeout=10)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "tls_required"


def test_tritonclient_http_with_ssl(tls_server, certs):
    client = httpclient.InferenceServerClient(url=f"localhost:{port_of(tls_server)}", ssl=True,
                                              ssl_options={"ca_certs": str(certs["ca"])})
    assert client.is_server_ready() and client.is_model_ready("mobilenet_v2")
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([base64.b64encode(CAT).decode()], dtype=object), binary_data=False)
    scores = client.infer("mobilenet_v2", [image]).as_numpy("scores")
    assert int(scores[0].argmax()) in CAT_CLASSES


def grpc_image():
    image = grpcclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([CAT], dtype=object))
    return image


def test_tritonclient_grpc_on_a_secure_channel(tls_server, certs):
    assert tls_server.grpc
    client = grpcclient.InferenceServerClient(url=f"localhost:{tls_server.grpc.rsplit(':', 1)[1]}", ssl=True,
                                              root_certificates=str(certs["ca"]))
    assert client.is_server_ready() and client.is_model_ready("mobilenet_v2")
    scores = client.infer("mobilenet_v2", [grpc_image()]).as_numpy("scores")
    assert int(scores[0].argmax()) in CAT_CLASSES
    # A plaintext channel to the TLS listener fails; it is not served in the clear.
    plain = grpcclient.InferenceServerClient(url=tls_server.grpc)
    with pytest.raises(InferenceServerException):
        plain.is_server_live(client_timeout=5)


def test_mutual_tls_needs_a_certificate_from_the_client_ca(mtls_server, certs):
    ca = str(certs["ca"])
    client_cert = tuple(map(str, certs["client"]))
    ok = requests.post(mtls_server.url("/v1/models/mobilenet_v2/predict"), data=CAT, verify=ca, cert=client_cert, timeout=60)
    assert ok.status_code == 200
    # No certificate: refused on every route but the probes, which orchestrators call without one.
    refused = requests.post(mtls_server.url("/v1/models/mobilenet_v2/predict"), data=CAT, verify=ca, timeout=60)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "client_certificate_required"
    for path in ("/v1/models", "/metrics", "/v2/models/mobilenet_v2", "/"):
        assert requests.get(mtls_server.url(path), verify=ca, timeout=10).status_code == 401, path
    for path in ("/health/live", "/health/ready", "/v2/health/ready"):
        assert requests.get(mtls_server.url(path), verify=ca, timeout=10).status_code == 200, path
    # A certificate from another CA fails the handshake itself.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(mtls_server.url("/health/live"), verify=ca, cert=tuple(map(str, certs["stranger"])), timeout=10)
    out = subprocess.run(["curl", "-sS", "--cacert", ca, "--cert", str(certs["stranger"][0]), "--key", str(certs["stranger"][1]),
                          mtls_server.url("/health/live")], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0, out.stdout
    assert metric(mtls_server, "visionserve_tls_handshake_failures_total", 'listener="rest"') >= 2


def test_mutual_tls_over_grpc(mtls_server, certs):
    port = mtls_server.grpc.rsplit(":", 1)[1]
    with_cert = grpcclient.InferenceServerClient(url=f"localhost:{port}", ssl=True, root_certificates=str(certs["ca"]),
                                                 private_key=str(certs["client"][1]), certificate_chain=str(certs["client"][0]))
    scores = with_cert.infer("mobilenet_v2", [grpc_image()]).as_numpy("scores")
    assert int(scores[0].argmax()) in CAT_CLASSES
    without = grpcclient.InferenceServerClient(url=f"localhost:{port}", ssl=True, root_certificates=str(certs["ca"]))
    assert without.is_server_ready()  # a probe
    with pytest.raises(InferenceServerException) as refused:
        without.infer("mobilenet_v2", [grpc_image()])
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED", refused.value


def test_check_ready_probes_over_tls(mtls_server):
    port = port_of(mtls_server)
    binary = os.environ["VISIONSERVE_BIN"]
    served = mtls_server.served
    probe = subprocess.run([binary, "--check-ready", "--addr", f"127.0.0.1:{port}", "--tls-cert", str(served / "cert.pem"),
                            "--tls-key", str(served / "key.pem")], capture_output=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    plain = subprocess.run([binary, "--check-ready", "--addr", f"127.0.0.1:{port}"], capture_output=True, timeout=30)
    assert plain.returncode == 1


def test_an_expired_certificate_is_refused_at_start(certs):
    binary = os.environ["VISIONSERVE_BIN"]
    cert, key = certs["expired"]
    run = subprocess.run([binary, "--addr", "127.0.0.1:0", "--grpc-addr", "off", "--model-repository", os.environ["VISIONSERVE_DEFAULT_MODELS"],
                          "--models", "mobilenet_v2", "--tls-cert", str(cert), "--tls-key", str(key)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "expired on" in run.stderr and str(cert) in run.stderr, run.stderr
    # A key that is not the certificate's, likewise.
    run = subprocess.run([binary, "--addr", "127.0.0.1:0", "--grpc-addr", "off", "--model-repository", os.environ["VISIONSERVE_DEFAULT_MODELS"],
                          "--tls-cert", str(certs["server"][0]), "--tls-key", str(certs["client"][1])], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "does not go with" in run.stderr, run.stderr


def served_certificate(server, ca):
    """The serial number of the certificate a new connection is given."""
    port = int(port_of(server))
    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.getpeercert()["serialNumber"]


def serial_of(pem):
    out = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-serial"], capture_output=True, text=True, check=True)
    return out.stdout.strip().split("=", 1)[1].upper()


def wait_for(predicate, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_a_renewed_certificate_is_served_without_a_restart(tls_server, certs):
    ca = str(certs["ca"])
    served = tls_server.served
    assert served_certificate(tls_server, ca) == serial_of(certs["server"][0])
    # (verify per call: requests lets REQUESTS_CA_BUNDLE override a session's own verify.)
    kept_alive = requests.Session()
    assert kept_alive.get(tls_server.url("/health/live"), verify=ca, timeout=10).status_code == 200

    # A renewal copied key first: for a moment the key does not match the certificate. That
    # set is refused and the old certificate goes on being served...
    (served / "key.pem").write_bytes(certs["renewed"][1].read_bytes())
    assert wait_for(lambda: any("cannot be served" in line for line in tls_server.log)), "".join(tls_server.log[-20:])
    assert served_certificate(tls_server, ca) == serial_of(certs["server"][0])
    # ... until the certificate arrives, and new connections get the new one, no restart.
    (served / "cert.pem").write_bytes(certs["renewed"][0].read_bytes())
    assert wait_for(lambda: served_certificate(tls_server, ca) == serial_of(certs["renewed"][0])), "".join(tls_server.log[-20:])
    assert tls_server.process.poll() is None
    assert kept_alive.get(tls_server.url("/health/live"), verify=ca, timeout=10).status_code == 200
    # The expiry gauge follows the served certificate.
    not_after = subprocess.run(["openssl", "x509", "-in", str(certs["renewed"][0]), "-noout", "-enddate"], capture_output=True, text=True).stdout
    expected = ssl.cert_time_to_seconds(not_after.strip().split("=", 1)[1])
    assert metric(tls_server, "visionserve_tls_certificate_expiry_timestamp_seconds") == expected

    # An expired certificate put in place is refused (the renewed one stays); SIGHUP asks for a
    # reload at once, and the old certificate comes back.
    (served / "cert.pem").write_bytes(certs["expired"][0].read_bytes())
    (served / "key.pem").write_bytes(certs["expired"][1].read_bytes())
    assert wait_for(lambda: sum("cannot be served" in line for line in tls_server.log) >= 2)
    assert served_certificate(tls_server, ca) == serial_of(certs["renewed"][0])
    (served / "cert.pem").write_bytes(certs["server"][0].read_bytes())
    (served / "key.pem").write_bytes(certs["server"][1].read_bytes())
    assert wait_for(lambda: served_certificate(tls_server, ca) == serial_of(certs["server"][0]))


def test_sighup_reloads_at_once_and_does_not_stop_the_server(tls_server):
    reloads = lambda: sum("reloaded" in line and "SIGHUP" in line for line in tls_server.log)
    before = reloads()
    tls_server.process.send_signal(signal.SIGHUP)
    assert wait_for(lambda: reloads() == before + 1, seconds=10), "".join(tls_server.log[-10:])
    assert tls_server.process.poll() is None
    assert requests.get(tls_server.url("/health/live"), verify=tls_server.verify, timeout=10).status_code == 200

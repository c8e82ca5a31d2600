// The web page in a real browser: pick each default model, upload a sample photo, wait for
// the result, check what the page shows, and save screenshots.
//
//   VISIONSERVE_BIN=... VISIONSERVE_DEFAULT_MODELS=... node --test page.test.mjs
//
// Screenshots go to test-output/browser/; with VISIONSERVE_UPDATE_SCREENSHOTS=1 they are also
// copied to docs/screenshots/ for the README.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, copyFileSync } from "node:fs";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const outDir = join(root, "test-output", "browser");
const docsDir = join(root, "docs", "screenshots");
mkdirSync(outDir, { recursive: true });

let server, base, browser;

/// A server over `repo` on an ephemeral port: resolves to { process, base } once it listens.
function startServer(repo, extra = []) {
  const bin = process.env.VISIONSERVE_BIN;
  assert.ok(bin && repo, "VISIONSERVE_BIN and VISIONSERVE_DEFAULT_MODELS (and VISIONSERVE_TEST_MODELS) must be set (run `make test`)");
  const child = spawn(bin, ["--addr", "127.0.0.1:0", "--grpc-addr", "off", "--model-repository", repo, ...extra], { stdio: ["ignore", "ignore", "pipe"] });
  return new Promise((resolvePromise, reject) => {
    const timeout = setTimeout(() => reject(new Error("server did not start")), 60000);
    let log = "", listening = false;
    child.stderr.on("data", chunk => {
      log += chunk.toString();
      const m = log.match(/listening on (http:\/\/\S+)/);
      if (m && !listening) { listening = true; clearTimeout(timeout); resolvePromise({ process: child, base: m[1] }); }
    });
    child.on("exit", code => reject(new Error(`server exited with ${code}: ${log}`)));
  });
}

async function waitReady(at) {
  for (let i = 0; i < 600; i++) {
    const r = await fetch(at + "/health/ready").catch(() => null);
    if (r && r.status === 200) return;
    await new Promise(r => setTimeout(r, 200));
  }
  throw new Error("models did not become ready");
}

before(async () => {
  ({ process: server, base } = await startServer(process.env.VISIONSERVE_DEFAULT_MODELS));
  await waitReady(base);
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-quic"],
    // playwright's launch() always starts Chromium on a fresh, temporary --user-data-dir.
  });
});

after(async () => {
  if (browser) await browser.close();
  if (server) server.kill("SIGTERM");
});

const CASES = [
  { model: "mobilenet_v2", sample: "chelsea.jpg", expect: /Egyptian cat|tabby|tiger cat/, shot: "classification" },
  { model: "ssd_mobilenet_v2_coco", sample: "chelsea.jpg", expect: /^cat$/, shot: "detection", boxes: true },
  { model: "text_detector_ppocr_v4", sample: "page.png", expect: /^text$/, shot: "segmentation" },
  { model: "mobilenet_v2_embedding", sample: "chelsea.jpg", expect: /^1280-d embedding$/, shot: "embedding" },
  // The pipeline: the detector's "cat", named by the classifier.
  { model: "detect_then_classify", sample: "chelsea.jpg", expect: /^(Egyptian cat|tabby|tiger cat) \(cat\)$/, shot: "pipeline", boxes: true },
];

for (const c of CASES) {
  test(`${c.model} on ${c.sample}`, async () => {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const errors = [];
    page.on("pageerror", e => errors.push(String(e)));
    await page.goto(base + "/");
    await page.waitForSelector(`#model option[value="${c.model}"]`, { state: "attached" });
    await page.selectOption("#model", c.model);
    await page.waitForSelector(`button[data-sample="${c.sample}"]`);
    await page.click(`button[data-sample="${c.sample}"]`);
    await page.waitForFunction(m => document.body.dataset.resultFor === m, c.model, { timeout: 60000 });
    const names = await page.$$eval("#result-labels .name", els => els.map(e => e.textContent));
    assert.ok(names.some(n => c.expect.test(n)), `${c.model}: page shows ${JSON.stringify(names)}`);
    const json = JSON.parse(await page.textContent("#json"));
    assert.equal(json.model, c.model);
    if (c.boxes) {
      const cat = json.results[0].detections.find(d => d.label === "cat");
      assert.ok(cat && cat.box.x2 - cat.box.x1 > 100, "a cat box is drawn");
    }
    const inference = await page.textContent("#t-inference");
    assert.ok(Number(inference) > 0, `inference time shown: ${inference}`);
    assert.deepEqual(errors, []);
    const file = join(outDir, `${c.shot}.png`);
    await page.screenshot({ path: file, fullPage: true });
    if (process.env.VISIONSERVE_UPDATE_SCREENSHOTS) {
      mkdirSync(docsDir, { recursive: true });
      copyFileSync(file, join(docsDir, `${c.shot}.png`));
    }
    await page.close();
  });
}

test("thresholds re-run the model and the page fits a phone", async () => {
  const page = await browser.newPage({ viewport: { width: 390, height: 844 }, isMobile: true });
  await page.goto(base + "/");
  await page.waitForSelector('#model option[value="ssd_mobilenet_v2_coco"]', { state: "attached" });
  await page.selectOption("#model", "ssd_mobilenet_v2_coco");
  await page.click('button[data-sample="coffee.jpg"]');
  await page.waitForFunction(() => document.body.dataset.resultFor === "ssd_mobilenet_v2_coco");
  const count = async () => JSON.parse(await page.textContent("#json")).results[0].detections.length;
  const before = await count();
  await page.$eval("#score", el => { el.value = "0.9"; el.dispatchEvent(new Event("input")); });
  await page.waitForFunction(() => JSON.parse(document.getElementById("json").textContent).results?.[0]?.detections?.every(d => d.score >= 0.9));
  const after = await count();
  assert.ok(after < before, `raising the threshold drops boxes (${before} → ${after})`);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `no horizontal scrolling on a phone (${overflow}px)`);
  await page.screenshot({ path: join(outDir, "phone.png"), fullPage: true });
  await page.close();
});

// Instance segmentation has no real weights in the default set (models/README.md): the test
// set's random-init Mask R-CNN, on a server of its own, its masks filled on the canvas.
test("mask_rcnn_small's instances are outlined on the page", async () => {
  const { process: masks, base: at } = await startServer(process.env.VISIONSERVE_TEST_MODELS, ["--models", "mask_rcnn_small"]);
  try {
    await waitReady(at);
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const errors = [];
    page.on("pageerror", e => errors.push(String(e)));
    await page.goto(at + "/");
    await page.waitForSelector('#model option[value="mask_rcnn_small"]', { state: "attached" });
    await page.selectOption("#model", "mask_rcnn_small");
    // The random weights score about 0.13: a low threshold shows their masks.
    await page.$eval("#score", el => { el.value = "0.1"; el.dispatchEvent(new Event("input")); });
    await page.click('button[data-sample="coffee.jpg"]');
    await page.waitForFunction(() => document.body.dataset.resultFor === "mask_rcnn_small"
      && JSON.parse(document.getElementById("json").textContent).results?.[0]?.detections?.length > 0, null, { timeout: 120000 });
    const json = JSON.parse(await page.textContent("#json"));
    const first = json.results[0].detections[0];
    assert.equal(json.task, "instance_segmentation");
    assert.equal(first.mask.format, "polygon");
    assert.ok(first.mask.polygons.length > 0 && first.area > 0, JSON.stringify(first).slice(0, 200));
    const names = await page.$$eval("#result-labels .value", els => els.map(e => e.textContent));
    assert.ok(names.some(v => / px$/.test(v)), `areas shown: ${JSON.stringify(names)}`);
    assert.deepEqual(errors, []);
    const file = join(outDir, "instance_segmentation.png");
    await page.screenshot({ path: file, fullPage: true });
    if (process.env.VISIONSERVE_UPDATE_SCREENSHOTS) copyFileSync(file, join(docsDir, "instance_segmentation.png"));
    await page.close();
  } finally {
    masks.kill("SIGTERM");
  }
});

// A task model's page on a sample, once it shows detections: random weights score about 0.5
// on the samples, so ultralytics' default threshold (0.25) shows them.
async function detectionsOnSample(at, model, sample) {
  await waitReady(at);
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on("pageerror", e => errors.push(String(e)));
  await page.goto(at + "/");
  await page.waitForSelector(`#model option[value="${model}"]`, { state: "attached" });
  await page.selectOption("#model", model);
  await page.$eval("#score", el => { el.value = "0.25"; el.dispatchEvent(new Event("input")); });
  await page.click(`button[data-sample="${sample}"]`);
  await page.waitForFunction(name => document.body.dataset.resultFor === name
    && JSON.parse(document.getElementById("json").textContent).results?.[0]?.detections?.length > 0, model, { timeout: 120000 });
  return { page, errors, json: JSON.parse(await page.textContent("#json")) };
}

test("yolov8n_pose's skeletons are drawn on the page", async () => {
  const repo = process.env.VISIONSERVE_TASK_MODELS;
  assert.ok(repo, "VISIONSERVE_TASK_MODELS must be set (run `make test`)");
  const { process: poses, base: at } = await startServer(repo, ["--models", "yolov8n_pose"]);
  try {
    const { page, errors, json } = await detectionsOnSample(at, "yolov8n_pose", "coffee.jpg");
    assert.equal(json.task, "keypoints");
    assert.equal(json.results[0].skeleton.length, 19);
    assert.equal(json.results[0].detections[0].keypoints.length, 51);
    assert.deepEqual(errors, []);
    const file = join(outDir, "keypoints.png");
    await page.screenshot({ path: file, fullPage: true });
    if (process.env.VISIONSERVE_UPDATE_SCREENSHOTS) copyFileSync(file, join(docsDir, "keypoints.png"));
    await page.close();
  } finally {
    poses.kill("SIGTERM");
  }
});

test("yolov8n_obb's rotated boxes are outlined on the page", async () => {
  const repo = process.env.VISIONSERVE_TASK_MODELS;
  assert.ok(repo, "VISIONSERVE_TASK_MODELS must be set (run `make test`)");
  const { process: server, base: at } = await startServer(repo, ["--models", "yolov8n_obb"]);
  try {
    const { page, errors, json } = await detectionsOnSample(at, "yolov8n_obb", "coffee.jpg");
    assert.equal(json.task, "oriented_detection");
    const d = json.results[0].detections[0];
    assert.equal(d.corners.length, 4);
    // The outline runs through the midpoint of each edge that lies inside the photo, in the
    // box's class colour (the page's palette).
    const drawn = await page.evaluate(({ corners, index }) => {
      const ctx = document.getElementById("canvas").getContext("2d");
      const want = colour(index);
      const hits = [];
      for (let k = 0; k < 4; k++) {
        const [a, b] = [corners[k], corners[(k + 1) % 4]];
        const [x, y] = [Math.round((a[0] + b[0]) / 2), Math.round((a[1] + b[1]) / 2)];
        if (x < 2 || y < 2 || x >= ctx.canvas.width - 2 || y >= ctx.canvas.height - 2) continue;
        const px = ctx.getImageData(x - 2, y - 2, 5, 5).data;
        let hit = false;
        for (let i = 0; i < px.length; i += 4) hit ||= Math.abs(px[i] - want[0]) + Math.abs(px[i + 1] - want[1]) + Math.abs(px[i + 2] - want[2]) < 30;
        hits.push(hit);
      }
      return hits;
    }, { corners: d.corners, index: d.index });
    assert.ok(drawn.length > 0 && drawn.every(Boolean), `edge midpoints drawn: ${JSON.stringify(drawn)}`);
    assert.deepEqual(errors, []);
    await page.screenshot({ path: join(outDir, "oriented_detection.png"), fullPage: true });
    await page.close();
  } finally {
    server.kill("SIGTERM");
  }
});

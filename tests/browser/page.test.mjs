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

function startServer() {
  const bin = process.env.VISIONSERVE_BIN, repo = process.env.VISIONSERVE_DEFAULT_MODELS;
  assert.ok(bin && repo, "VISIONSERVE_BIN and VISIONSERVE_DEFAULT_MODELS must be set (run `make test`)");
  server = spawn(bin, ["--addr", "127.0.0.1:0", "--model-repository", repo], { stdio: ["ignore", "ignore", "pipe"] });
  return new Promise((resolvePromise, reject) => {
    const timeout = setTimeout(() => reject(new Error("server did not start")), 60000);
    let log = "";
    server.stderr.on("data", chunk => {
      log += chunk.toString();
      const m = log.match(/listening on (http:\/\/\S+)/);
      if (m && !base) { base = m[1]; clearTimeout(timeout); resolvePromise(); }
    });
    server.on("exit", code => reject(new Error(`server exited with ${code}: ${log}`)));
  });
}

async function waitReady() {
  for (let i = 0; i < 600; i++) {
    const r = await fetch(base + "/health/ready").catch(() => null);
    if (r && r.status === 200) return;
    await new Promise(r => setTimeout(r, 200));
  }
  throw new Error("models did not become ready");
}

before(async () => {
  await startServer();
  await waitReady();
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

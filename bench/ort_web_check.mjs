// onnxruntime-web (wasm backend, in Node) on an exported model.onnx: the node side of
// bench/onnx_check.py --node_modules_dir=DIR, which writes the inputs and compares the logits.
//
// Needs `npm install onnxruntime-web@1.30.0` in NODE_MODULES_DIR (the dir holding node_modules,
// or node_modules itself):
//
//   node bench/ort_web_check.mjs NODE_MODULES_DIR MODEL.onnx INPUTS.json OUT.json [LEVEL]
//
// LEVEL: graphOptimizationLevel, 'all' (onnxruntime-web's default), 'extended', 'basic' or
// 'disabled'. (Measured on the float64 graph: 'basic' reproduces ONNX Runtime CPU bit for bit,
// 'extended' and 'all' do not.)
// INPUTS.json: {"shape": [N, L], "input_ids": [...], "attention_mask": [...],
// "token_type_ids": [...]} (flat int lists). OUT.json: {"ok": true, "shape", "logits" (flat),
// "load_s", "run_s", "version"} or {"ok": false, "stage": "load"|"run", "error": message}.
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';

const [dir, modelPath, inputsPath, outPath, level = 'all'] = process.argv.slice(2);
const ort = createRequire(join(resolve(dir), 'ort_web_check.js'))('onnxruntime-web');
ort.env.wasm.numThreads = 1;  // one core: the check is about numbers, not speed
const out = { version: ort.env.versions.web, level };
let stage = 'load';
try {
  let t0 = performance.now();
  const session = await ort.InferenceSession.create(readFileSync(modelPath),
                                                    { executionProviders: ['wasm'],
                                                      graphOptimizationLevel: level });
  out.load_s = (performance.now() - t0) / 1000;
  stage = 'run';
  const inputs = JSON.parse(readFileSync(inputsPath, 'utf8'));
  const feeds = {};
  for (const name of ['input_ids', 'attention_mask', 'token_type_ids']) {
    feeds[name] = new ort.Tensor('int64', BigInt64Array.from(inputs[name], BigInt), inputs.shape);
  }
  t0 = performance.now();
  const result = await session.run(feeds);
  out.run_s = (performance.now() - t0) / 1000;
  const logits = result[session.outputNames[0]];
  Object.assign(out, { ok: true, type: logits.type, shape: logits.dims,
                       logits: Array.from(logits.data, Number) });
} catch (e) {
  Object.assign(out, { ok: false, stage, error: String(e && e.message || e) });
}
writeFileSync(outPath, JSON.stringify(out));
console.log(out.ok ? `ok: ${out.shape} ${out.type} logits, load ${out.load_s.toFixed(1)}s, ` +
                     `run ${out.run_s.toFixed(1)}s` : `${stage} failed: ${out.error}`);

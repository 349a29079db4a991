// Validates an OpenAPI document with @seriousme/openapi-schema-validator against the official
// schema of its version and resolves every $ref; then checks real answers against the response
// schemas the document gives them (Ajv, JSON Schema 2020-12, OpenAPI 3.1's dialect).
// Argument: {"file": path, "samples": [{"method", "path" (as described), "status", "body"}]}.
// Prints one JSON line: {"valid": true, "version", "checked": n} or {"error": ...}.
import { Validator } from "@seriousme/openapi-schema-validator";
import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";

const args = JSON.parse(process.argv[2]);
const validator = new Validator();
const res = await validator.validate(args.file);
if (!res.valid) {
  console.log(JSON.stringify({ error: res.errors }));
  process.exit(0);
}
let spec;
try {
  spec = validator.resolveRefs();
} catch (e) {
  console.log(JSON.stringify({ error: `a $ref does not resolve: ${e.message}` }));
  process.exit(0);
}
const ajv = new Ajv2020({ strict: false, allErrors: true });
addFormats(ajv);
let checked = 0;
for (const s of args.samples ?? []) {
  const op = spec.paths?.[s.path]?.[s.method.toLowerCase()];
  if (!op) {
    console.log(JSON.stringify({ error: `${s.method} ${s.path} is not described` }));
    process.exit(0);
  }
  const schema = op.responses?.[String(s.status)]?.content?.["application/json"]?.schema;
  if (!schema) {
    console.log(JSON.stringify({ error: `${s.method} ${s.path}: no schema for ${s.status}` }));
    process.exit(0);
  }
  const check = ajv.compile(schema);
  if (!check(s.body)) {
    console.log(JSON.stringify({ error: { op: `${s.method} ${s.path}`, errors: check.errors, body: s.body } }));
    process.exit(0);
  }
  checked += 1;
}
console.log(JSON.stringify({ valid: true, version: validator.version, checked }));

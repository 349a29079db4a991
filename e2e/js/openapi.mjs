// Validates an OpenAPI document (argument: its file) with @seriousme/openapi-schema-validator
// against the official schema of its version, then resolves every $ref. Prints one JSON line:
// {"valid": true, "version": "3.1"} or {"error": ...}.
import { Validator } from "@seriousme/openapi-schema-validator";

const file = JSON.parse(process.argv[2]).file;
const validator = new Validator();
const res = await validator.validate(file);
if (!res.valid) {
  console.log(JSON.stringify({ error: res.errors }));
  process.exit(0);
}
try {
  validator.resolveRefs();
} catch (e) {
  console.log(JSON.stringify({ error: `a $ref does not resolve: ${e.message}` }));
  process.exit(0);
}
console.log(JSON.stringify({ valid: true, version: validator.version }));

// Parse an AsyncAPI document with the official parser; exit 1 with its diagnostics on any error
// (and on warnings too: a contract that parses with warnings is not one clients can rely on).
import { readFile } from "node:fs/promises";
import { Parser, DiagnosticSeverity } from "@asyncapi/parser";

const path = process.argv[2];
if (!path) {
  console.error("usage: node check.mjs <asyncapi.json>");
  process.exit(2);
}
const text = await readFile(path, "utf8");
const parser = new Parser();
const { document, diagnostics } = await parser.parse(text, { source: path });
const severities = ["error", "warning", "info", "hint"];
let bad = 0;
for (const d of diagnostics) {
  const where = d.path && d.path.length ? d.path.join("/") : "(document)";
  console.log(`${severities[d.severity] ?? d.severity} ${d.code}: ${d.message} at ${where}`);
  if (d.severity === DiagnosticSeverity.Error || d.severity === DiagnosticSeverity.Warning) bad += 1;
}
if (!document || bad) {
  console.error(`${path}: rejected by @asyncapi/parser (${bad} error/warning diagnostic(s))`);
  process.exit(1);
}
console.log(`${path}: valid AsyncAPI ${document.version()} (${document.channels().length} channels, ` +
  `${document.operations().length} operations, ${document.components().messages().length} messages)`);

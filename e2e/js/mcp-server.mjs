// A small MCP server (the official TypeScript SDK, Streamable HTTP, stateless) for the end-to-end
// tests, published as a resource behind an agent.
//
// usage: node mcp-server.mjs PORT
// Serves POST /mcp on 127.0.0.1:PORT with one tool, `whoami`, which answers what this request
// carried: the Authorization header (the client's OAuth token must never arrive here), the
// identity headers the gateway added, and whether a signed assertion came. Prints "listening".
import http from 'node:http';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';

const port = Number(process.argv[2]);
const srv = http.createServer(async (req, res) => {
  const seen = {
    authorization: req.headers['authorization'] ?? null,
    user: req.headers['remote-user'] ?? null,
    email: req.headers['remote-email'] ?? null,
    assertion: req.headers['kakuremichi-jwt-assertion'] ?? null,
  };
  if (req.url !== '/mcp') {
    res.writeHead(404).end();
    return;
  }
  if (req.method !== 'POST') {
    res.writeHead(405, { allow: 'POST' }).end();
    return;
  }
  const chunks = [];
  for await (const c of req) chunks.push(c);
  let body;
  try {
    body = JSON.parse(Buffer.concat(chunks).toString());
  } catch {
    res.writeHead(400).end();
    return;
  }
  const server = new McpServer({ name: 'kakuremichi-e2e-tools', version: '1.0.0' });
  server.registerTool('whoami', { description: 'What this server was told about the caller' },
    async () => ({ content: [{ type: 'text', text: JSON.stringify(seen) }] }));
  const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
  res.on('close', () => {
    transport.close();
    server.close();
  });
  await server.connect(transport);
  await transport.handleRequest(req, res, body);
});
srv.listen(port, '127.0.0.1', () => console.log('listening'));

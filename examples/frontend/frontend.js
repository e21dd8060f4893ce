#!/usr/bin/env node
// A front end's use of warden, the smallest that is whole: it runs one
// Claude Code session for a user through wardend, streams the transcript,
// shows each permission request Claude makes and answers it, and prints
// the user's API usage at the end. A web front end does the same with a
// browser on the other side of each step.
//
//   node frontend.js --user alice [--profile claude-code] [--answer ask|allow|deny]
//                    [--socket /run/warden/warden.sock] [--proto DIR] PROMPT...
//
// The front end needs no key and no privilege: wardend holds the user's
// credential and builds the sandbox; the front end's uid only has to be in
// wardend.toml's service_uids (to act for every user) and reach the socket
// (group `warden`).
'use strict';

const path = require('path');
const readline = require('readline');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function parseArgs(argv) {
  const opts = {
    socket: '/run/warden/warden.sock',
    proto: path.join(__dirname, '../../proto'),
    profile: 'claude-code',
    answer: 'ask',
    user: null,
    prompt: [],
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (['--socket', '--proto', '--profile', '--answer', '--user'].includes(flag)) {
      opts[flag.slice(2)] = argv[++i];
    } else {
      opts.prompt.push(flag);
    }
  }
  if (!opts.user || !opts.prompt.length || !['ask', 'allow', 'deny'].includes(opts.answer)) {
    console.error('usage: frontend.js --user U [--profile P] [--answer ask|allow|deny] [--socket S] [--proto DIR] PROMPT...');
    process.exit(64);
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const warden = grpc.loadPackageDefinition(protoLoader.loadSync(
  ['warden/v1/workers.proto', 'warden/v1/events.proto', 'warden/v1/usage.proto'],
  { includeDirs: [opts.proto], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
)).warden.v1;
// Over a Unix socket, with grpc-js's defaults.
const target = 'unix:' + opts.socket;
const creds = grpc.credentials.createInsecure();
const workers = new warden.Workers(target, creds);
const events = new warden.Events(target, creds);
const usage = new warden.Usage(target, creds);
const unary = (client, method, req) => new Promise((resolve, reject) =>
  client[method](req, (err, res) => (err ? reject(err) : resolve(res))));

// One line of Claude Code's stream-json transcript, as a person reads it.
function show(line) {
  let m;
  try {
    m = JSON.parse(line);
  } catch {
    return;
  }
  if (m.type === 'assistant') {
    for (const c of m.message.content || []) {
      if (c.type === 'text') console.log(`claude: ${c.text}`);
      if (c.type === 'tool_use') console.log(`claude wants ${c.name}: ${JSON.stringify(c.input)}`);
    }
  } else if (m.type === 'user') {
    for (const c of (m.message && m.message.content) || []) {
      if (c.type === 'tool_result') {
        const text = typeof c.content === 'string' ? c.content : JSON.stringify(c.content);
        console.log(`  ${c.is_error ? 'refused' : 'result'}: ${text.trim().slice(0, 200)}`);
      }
    }
  } else if (m.type === 'result') {
    console.log(`result: ${m.result} (${m.num_turns} turns)`);
  }
}

// The user's answer to one permission request: from the terminal, or the
// fixed one --answer gives.
async function decide(req) {
  if (opts.answer !== 'ask') return opts.answer === 'allow';
  const rl = readline.createInterface({ input: process.stdin, output: process.stdout });
  const reply = await new Promise((resolve) => rl.question('allow? [y/N] ', resolve));
  rl.close();
  return /^y/i.test(reply.trim());
}

async function main() {
  const session = await unary(workers, 'Spawn', {
    user: opts.user, profile: opts.profile, command: [opts.prompt.join(' ')],
  });
  console.log(`session ${session.id} for ${opts.user} (profile ${opts.profile})`);

  // Permission requests arrive as events; any client that may act for the
  // user may answer them.
  const asked = events.Watch({ from_seq: 1, worker: session.id, kinds: ['approval_requested'] });
  asked.on('data', async (r) => {
    if (r.msg !== 'event') return;
    const req = JSON.parse(r.event.json);
    console.log(`permission request ${req.request_id}: ${req.tool} ${JSON.stringify(req.input)}`);
    const allow = await decide(req);
    await unary(workers, 'Approve', {
      id: session.id, request_id: req.request_id, allow, message: allow ? '' : 'the user said no',
    });
    console.log(`  ${allow ? 'allowed' : 'denied'}`);
  });
  asked.on('error', (e) => { if (e.code !== grpc.status.CANCELLED) console.error(`events: ${e.message}`); });

  // The transcript, from its first byte, until the session ends.
  const attach = workers.Attach();
  attach.write({ start: { id: session.id } });
  let pending = '';
  const exit = await new Promise((resolve, reject) => {
    attach.on('data', (m) => {
      if (m.msg === 'output' && m.output.stream === 'STREAM_STDOUT') {
        pending += m.output.data.toString();
        let i;
        while ((i = pending.indexOf('\n')) >= 0) {
          show(pending.slice(0, i));
          pending = pending.slice(i + 1);
        }
      } else if (m.msg === 'exited') {
        resolve(m.exited.exit_code);
        attach.end();
      }
    });
    attach.on('error', reject);
  });
  asked.cancel();

  const u = await unary(usage, 'Get', { user: opts.user });
  for (const user of u.users) {
    const t = user.all_time;
    console.log(`usage of ${user.user}: ${t.requests} requests, ${t.input_tokens} input and ${t.output_tokens} output tokens`);
  }
  return exit;
}

main().then((code) => process.exit(code), (e) => {
  console.error(`frontend: ${e.message}`);
  process.exit(1);
});

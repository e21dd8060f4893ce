// A Node gRPC client of wardend (@grpc/grpc-js, @grpc/proto-loader) with
// the default options. Run by tests/tests/clients.rs against a real
// wardend: health, reflection, Spawn, Attach with stdin, Wait, Attach
// with spawn, Events.Watch with replay and, given a profile that asks for
// approvals, a Claude Code approval round trip. Prints one JSON object per
// step.
//
// usage: node check.js SOCKET PROTO_DIR USER [CLAUDE_PROFILE]
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [socket, protoDir, user, claudeProfile] = process.argv.slice(2);
const healthProto = require.resolve('grpc-health-check/proto/health/v1/health.proto');
const reflectionProto = path.join(
  path.dirname(require.resolve('@grpc/reflection/package.json')),
  'build/proto/grpc/reflection/v1/reflection.proto');

const load = (files, dirs) => grpc.loadPackageDefinition(protoLoader.loadSync(files, {
  includeDirs: dirs, keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
}));
const warden = load(
  ['warden/v1/workers.proto', 'warden/v1/events.proto', 'warden/v1/usage.proto'], [protoDir]).warden.v1;
const health = load([healthProto], [path.dirname(healthProto)]).grpc.health.v1;
const reflection = load([reflectionProto], [path.dirname(reflectionProto)]).grpc.reflection.v1;

const target = 'unix:' + socket;
const creds = grpc.credentials.createInsecure();
const say = (step, fields) => console.log(JSON.stringify({ step, ...fields }));
const call = (client, method, req) => new Promise((resolve, reject) =>
  client[method](req, (err, res) => (err ? reject(err) : resolve(res))));
const collect = (stream) => new Promise((resolve, reject) => {
  const got = [];
  stream.on('data', (m) => got.push(m));
  stream.on('end', () => resolve(got));
  stream.on('error', reject);
});

async function main() {
  const status = await call(new health.Health(target, creds), 'Check', { service: '' });
  say('health', { status: status.status });

  const refl = new reflection.ServerReflection(target, creds).ServerReflectionInfo();
  refl.write({ list_services: '' });
  refl.end();
  const answers = await collect(refl);
  const services = answers.flatMap((a) => a.list_services_response.service.map((s) => s.name)).sort();
  say('reflection', { services });

  const workers = new warden.Workers(target, creds);
  const worker = await call(workers, 'Spawn', {
    user, command: ['sh', '-c', 'read line; echo got:$line; echo oops >&2; exit 3'],
  });
  say('spawn', { id: worker.id, state: worker.state });

  const attach = workers.Attach();
  attach.write({ start: { id: worker.id } });
  attach.write({ stdin: Buffer.from('hello from node\n') });
  attach.write({ close_stdin: true });
  let out = '';
  let err = '';
  let exited = null;
  attach.on('data', (m) => {
    if (m.msg === 'output') {
      if (m.output.stream === 'STREAM_STDERR') err += m.output.data.toString();
      else out += m.output.data.toString();
    } else if (m.msg === 'exited') {
      exited = m.exited.exit_code;
      attach.end();
    }
  });
  await new Promise((resolve, reject) => { attach.on('end', resolve); attach.on('error', reject); });
  say('attach', { stdout: out, stderr: err, exit_code: exited });

  const done = await call(workers, 'Wait', { id: worker.id });
  say('wait', { exit_code: done.exit_code, reason: done.reason });

  const events = new warden.Events(target, creds);
  const replay = await collect(events.Watch({ from_seq: 1, worker: worker.id, replay_only: true }));
  say('watch', { kinds: replay.filter((r) => r.msg === 'event').map((r) => r.event.kind) });

  // Started and attached to in one call.
  const one = workers.Attach();
  one.write({ start: { spawn: { user, command: ['sh', '-c', 'echo one call; exit 4'] } } });
  one.write({ close_stdin: true });
  const seen = [];
  let oneOut = '';
  let oneExit = null;
  one.on('data', (m) => {
    seen.push(m.msg);
    if (m.msg === 'output') oneOut += m.output.data.toString();
    else if (m.msg === 'exited') {
      oneExit = m.exited.exit_code;
      one.end();
    }
  });
  await new Promise((resolve, reject) => { one.on('end', resolve); one.on('error', reject); });
  say('spawn_attach', { first: seen[0], stdout: oneOut, exit_code: oneExit });

  if (claudeProfile) {
    const session = await call(workers, 'Spawn', { user, profile: claudeProfile, command: ['make a file'] });
    const asked = await new Promise((resolve, reject) => {
      const live = events.Watch({ from_seq: 1, worker: session.id, kinds: ['approval_requested'] });
      live.on('data', (r) => {
        if (r.msg === 'event') {
          resolve(JSON.parse(r.event.json));
          live.cancel();
        }
      });
      live.on('error', (e) => { if (e.code !== grpc.status.CANCELLED) reject(e); });
    });
    await call(workers, 'Approve', { id: session.id, request_id: asked.request_id, allow: true });
    const ended = await call(workers, 'Wait', { id: session.id });
    const usage = await call(new warden.Usage(target, creds), 'Get', { user });
    say('approval', {
      tool: asked.tool,
      command: (asked.input || {}).command || '',
      exit_code: ended.exit_code,
      requests: Number(usage.users.length ? usage.users[0].all_time.requests : 0),
    });
  }
}

main().then(() => process.exit(0), (e) => {
  console.error(e);
  process.exit(1);
});

"""A Python gRPC client of wardend with grpcio's default options.

Run by tests/tests/clients.rs against a real wardend: health, reflection,
Spawn, Attach with stdin, Wait, Attach with spawn, Events.Watch with replay and, given a
profile that asks for approvals, a Claude Code approval round trip. Prints
one JSON object per step on stdout; the test checks them.

usage: check.py SOCKET STUBS_DIR USER [CLAUDE_PROFILE]
"""

import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

socket, stubs, user = sys.argv[1], sys.argv[2], sys.argv[3]
claude_profile = sys.argv[4] if len(sys.argv) > 4 else None
sys.path.insert(0, stubs)
from warden.v1 import events_pb2, events_pb2_grpc  # noqa: E402
from warden.v1 import usage_pb2, usage_pb2_grpc  # noqa: E402
from warden.v1 import workers_pb2, workers_pb2_grpc  # noqa: E402


def say(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


# The default options: no authority override, nothing else.
channel = grpc.insecure_channel("unix:" + socket)

status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
say("health", status=health_pb2.HealthCheckResponse.ServingStatus.Name(status.status))

reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
services = [s.name for a in answers for s in a.list_services_response.service]
say("reflection", services=sorted(services))

workers = workers_pb2_grpc.WorkersStub(channel)
worker = workers.Spawn(
    workers_pb2.SpawnRequest(
        user=user,
        command=["sh", "-c", "read line; echo got:$line; echo oops >&2; exit 3"],
    ),
    timeout=30,
)
say("spawn", id=worker.id, state=workers_pb2.WorkerState.Name(worker.state))


def attach_requests():
    yield workers_pb2.AttachRequest(start=workers_pb2.AttachStart(id=worker.id))
    yield workers_pb2.AttachRequest(stdin=b"hello from python\n")
    yield workers_pb2.AttachRequest(close_stdin=True)


out, err, exited = b"", b"", None
for msg in workers.Attach(attach_requests(), timeout=30):
    if msg.HasField("output"):
        if msg.output.stream == workers_pb2.STREAM_STDERR:
            err += msg.output.data
        else:
            out += msg.output.data
    elif msg.HasField("exited"):
        exited = msg.exited.exit_code
say("attach", stdout=out.decode(), stderr=err.decode(), exit_code=exited)

done = workers.Wait(workers_pb2.WaitRequest(id=worker.id), timeout=30)
say("wait", exit_code=done.exit_code, reason=workers_pb2.ExitReason.Name(done.reason))

watch = events_pb2_grpc.EventsStub(channel).Watch(
    events_pb2.WatchRequest(from_seq=1, worker=worker.id, replay_only=True), timeout=30
)
kinds = [r.event.kind for r in watch if r.HasField("event")]
say("watch", kinds=kinds)

# Started and attached to in one call.
one = workers_pb2.AttachStart(spawn=workers_pb2.SpawnRequest(user=user, command=["sh", "-c", "echo one call; exit 4"]))
seen, out, exited = [], b"", None
for msg in workers.Attach(
    iter([workers_pb2.AttachRequest(start=one), workers_pb2.AttachRequest(close_stdin=True)]), timeout=30
):
    seen.append(msg.WhichOneof("msg"))
    if msg.HasField("output"):
        out += msg.output.data
    elif msg.HasField("exited"):
        exited = msg.exited.exit_code
say("spawn_attach", first=seen[0], stdout=out.decode(), exit_code=exited)

if claude_profile:
    # A Claude Code session whose tool call waits for a client's answer.
    session = workers.Spawn(
        workers_pb2.SpawnRequest(user=user, profile=claude_profile, command=["make a file"]), timeout=60
    )
    live = events_pb2_grpc.EventsStub(channel).Watch(
        events_pb2.WatchRequest(from_seq=1, worker=session.id, kinds=["approval_requested"]), timeout=120
    )
    asked = json.loads(next(r.event.json for r in live if r.HasField("event")))
    live.cancel()
    workers.Approve(
        workers_pb2.ApproveRequest(id=session.id, request_id=asked["request_id"], allow=True), timeout=30
    )
    ended = workers.Wait(workers_pb2.WaitRequest(id=session.id), timeout=120)
    usage = usage_pb2_grpc.UsageStub(channel).Get(usage_pb2.UsageRequest(user=user), timeout=30)
    say(
        "approval",
        tool=asked["tool"],
        command=asked["input"].get("command", ""),
        exit_code=ended.exit_code,
        requests=usage.users[0].all_time.requests if usage.users else 0,
    )

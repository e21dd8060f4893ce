"""Raw HTTP/2 requests to wardend's socket, one connection each, carrying
each `:authority` gRPC clients send over a Unix socket (and none at all),
HPACK-encoded the way the h2 library does (Huffman strings, the dynamic
table): a Health/Check each. Prints one JSON object per request.

usage: authorities.py SOCKET
"""

import json
import socket
import sys

import h2.config
import h2.connection
import h2.events

path = sys.argv[1]
forms = [
    ("grpc-go, grpc-js", "localhost"),
    ("gRPC C-core (Python, Ruby, C++)", path.lstrip("/").replace("/", "%2F")),
    ("grpc-java", path),
    ("a unix: target", "unix:" + path),
    ("an IPv6 literal", "[::1]:50051"),
    ("none", None),
]
# An empty HealthCheckRequest in a gRPC message frame.
body = b"\x00\x00\x00\x00\x00"

for name, authority in forms:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    # (h2 refuses to send a request without an authority unless told.)
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8", validate_outbound_headers=False)
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    headers = [(":method", "POST"), (":scheme", "http"), (":path", "/grpc.health.v1.Health/Check")]
    if authority is not None:
        headers.append((":authority", authority))
    headers += [("te", "trailers"), ("content-type", "application/grpc"), ("x-padding", "p" * 300)]
    # Twice on one connection: the second leans on the first's entries in
    # the dynamic table.
    for stream in (1, 3):
        conn.send_headers(stream, headers)
        conn.send_data(stream, body, end_stream=True)
    s.sendall(conn.data_to_send())
    results = {1: {}, 3: {}}
    while not all(r.get("done") for r in results.values()):
        data = s.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                results[event.stream_id]["status"] = dict(event.headers).get(":status")
            elif isinstance(event, h2.events.TrailersReceived):
                results[event.stream_id]["grpc_status"] = dict(event.headers).get("grpc-status")
                results[event.stream_id]["done"] = True
            elif isinstance(event, h2.events.StreamReset):
                results[event.stream_id].update(reset=int(event.error_code), done=True)
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        s.sendall(conn.data_to_send())
    s.close()
    print(json.dumps({"client": name, "authority": authority, "answers": [results[1], results[3]]}), flush=True)

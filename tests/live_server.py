"""A minillm server running in a background thread on a free loopback port, for tests that talk to it
over real HTTP (tests/test_serve_api.py; the page's browser tests can use it too).

    with live_server(served) as url:      # "http://127.0.0.1:PORT"; stopped when the block ends
        ...
"""

import contextlib
import threading
import time

import uvicorn

from minillm.serve.app import build_app


@contextlib.contextmanager
def live_server(served, start_seconds: float = 20.0):
    server = uvicorn.Server(uvicorn.Config(build_app(served), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_seconds
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        served.close()

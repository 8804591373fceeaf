"""The fault tool of the S3 outage test: a request through the proxy reaches the server until
the armed pattern passes; then the port refuses connections for the outage, and answers again
on the same port afterwards."""

import http.server
import threading
import time
import urllib.error
import urllib.request

import pytest
from outage_proxy import OutageProxy

from components.platform.ports import HOST


class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer((HOST, 0), Answer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


def get(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_the_port_refuses_connections_for_the_outage_then_answers_again(server):
    with OutageProxy(server.server_address[1]) as proxy:
        assert get(f"{proxy.endpoint}/a") == "/a"
        proxy.trip_on(b"GET /trip", seconds=1.5)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            get(f"{proxy.endpoint}/trip")  # not forwarded: the connection is reset
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # refused, or reset
            get(f"{proxy.endpoint}/b")  # if the kernel had queued it before the close
        time.sleep(2.0)
        assert get(f"{proxy.endpoint}/c") == "/c"  # same port, and the trip is spent
        assert get(f"{proxy.endpoint}/trip") == "/trip"
        [outage] = proxy.outages
        assert outage.trigger == b"GET /trip" and 1.5 <= outage.seconds < 2.5
        assert proxy.sightings == {b"GET /trip": 2}  # the dropped request and the later one

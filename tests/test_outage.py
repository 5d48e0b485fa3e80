"""An outage is not a thousand failures: unreachable is its own kind, stops a run that never got an answer,
and is waited out (pool held, server probed, no attempt spent) once the server has answered.

Classification is checked on hand-built cause chains and on what the real SDK raises (both transports)
against a closed port, an unresolvable name and a TLS handshake with a plain-HTTP port; the run through
the CLI against the loopback server, which is taken away and brought back on the same port.
"""

from __future__ import annotations

import errno
import json
import re
import socket
import ssl
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import anyio
import openai
import pytest

from conftest import KEY, make_big_market, prepare_index, rows, spawn, wait_for_rows
from pipeline.providers.base import APIFailure, ErrorKind, ImagePayload, ModelRequest
from pipeline.providers.openai import OpenAIBackend, _httpx, failure_from_sdk
from pipeline.run.control import Gate
from pipeline.run.outage import (
    GATE_CAUSE,
    Outage,
    OutagePolicy,
    OutageTracker,
    cannot_reach_message,
    display_url,
    fmt_span,
    gave_up_message,
    next_probe_delay,
    outage_text,
    probe_until_answer,
    time_left,
)
from pipeline.run.stats import RunStats
from pipeline.testing.realserver import free_port
from test_run import check_captions_belong

K = ErrorKind


# --- pure decisions ----------------------------------------------------------------------------------------

P = OutagePolicy()  # 300 s, 0.5 s doubling to 15 s


def test_probe_delays_double_up_to_a_cap():
    assert [next_probe_delay(i, P) for i in range(8)] == [0.5, 1, 2, 4, 8, 15, 15, 15]
    assert next_probe_delay(10**9, P) == 15  # no overflow however long the outage
    assert next_probe_delay(-1, P) == 0.5


def test_time_left():
    assert time_left(100.0, 100.0, P) == 300.0
    assert time_left(100.0, 350.0, P) == 50.0
    assert time_left(100.0, 400.0, P) <= 0


@pytest.mark.parametrize(("seconds", "text"), [
    (2, "2 s"), (0.5, "0.5 s"), (45, "45 s"), (90, "90 s"), (300, "5 min"), (600, "10 min"), (900, "15 min"),
    (5400, "90 min"), (7200, "2 h"),
])
def test_fmt_span(seconds, text):
    assert fmt_span(seconds) == text


@pytest.mark.parametrize(("url", "shown"), [
    ("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"),
    ("http://127.0.0.1:9/v1/", "http://127.0.0.1:9/v1"),
    ("https://user:s3cret@proxy.example/v1?key=s3cret", "https://proxy.example/v1"),  # never a credential
])
def test_display_url_hides_credentials(url, shown):
    assert display_url(url) == shown


def test_messages():
    assert cannot_reach_message("http://127.0.0.1:9/v1/", "connection refused") == (
        "cannot reach http://127.0.0.1:9/v1: connection refused")
    outage = Outage(since=0.0, since_wall=datetime(2024, 5, 6, 14, 2, 11), why="connection refused")
    assert gave_up_message("https://api.openai.com/v1", outage, P) == (
        "cannot reach https://api.openai.com/v1 since 14:02:11 (5 min): connection refused")
    assert gave_up_message("http://h/v1", outage, OutagePolicy(timeout_s=2)) == (
        "cannot reach http://h/v1 since 14:02:11 (2 s): connection refused")
    assert outage_text(12.4, "connection refused") == "server unreachable for 12 s (connection refused); probing"


# --- the tracker and the probe loop, without a server ------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_tracker_holds_the_gate_until_a_probe_answers_and_the_outage_until_a_request_does():
    gate, stats, clock = Gate(), RunStats(), Clock()
    tracker = OutageTracker(gate, "http://h/v1", P, stats=stats, clock=clock)
    assert not tracker.heard and tracker.current is None and gate.is_open
    tracker.heard_from_server()
    first = tracker.unreachable("connection refused")
    assert not gate.is_open and GATE_CAUSE in gate.reasons and tracker.holding
    assert stats.outage_since == clock.t and stats.outage_why == "connection refused"
    assert stats.snapshot().outage_s is not None
    clock.t += 5
    assert tracker.unreachable("connection refused") is first  # the same outage: its clock runs on
    tracker.probe_answered()
    assert gate.is_open and not tracker.holding and tracker.current is first
    assert stats.snapshot().outage_s is None
    clock.t += 5
    again = tracker.unreachable("host name not found")  # the probe answered, requests still fail
    assert again is first and again.since == 1000.0 and again.why == "host name not found" and not gate.is_open
    tracker.heard_from_server()  # a request was answered: the outage is over
    assert gate.is_open and tracker.current is None and stats.outage_since is None
    assert tracker.unreachable("connection refused") is not first


def test_the_gate_keeps_other_causes():
    gate = Gate()
    tracker = OutageTracker(gate, "http://h/v1", P)
    gate.close("disk", "disk full")
    tracker.unreachable("connection refused")
    tracker.heard_from_server()
    assert not gate.is_open and set(gate.reasons) == {"disk"}


FAST = OutagePolicy(timeout_s=5.0, first_probe_s=0.01, max_probe_s=0.04)


@pytest.mark.anyio
async def test_probe_loop_opens_the_gate_when_the_server_answers():
    tracker = OutageTracker(Gate(), "http://h/v1", FAST)
    answers = iter([False, False, True])
    calls: list[float] = []
    given_up: list[str] = []

    async def probe() -> bool:
        calls.append(time.monotonic())
        return next(answers)

    tracker.heard_from_server()
    outage = tracker.unreachable("connection refused")
    async with anyio.create_task_group() as tg:
        tg.start_soon(probe_until_answer, tracker, probe, given_up.append)
        with anyio.fail_after(5):
            await tracker.gate.wait_open()
        tg.cancel_scope.cancel()
    assert len(calls) == 3 and outage.probes == 3 and not given_up
    assert tracker.current is outage  # the probe answered; only a request's answer ends the outage


@pytest.mark.anyio
async def test_probe_loop_gives_up_after_the_outage_timeout():
    policy = OutagePolicy(timeout_s=0.3, first_probe_s=0.01, max_probe_s=0.05)
    stats = RunStats()
    tracker = OutageTracker(Gate(), "http://127.0.0.1:9/v1", policy, stats=stats)
    given_up: list[str] = []

    async def probe() -> bool:
        return False

    tracker.heard_from_server()
    tracker.unreachable("connection refused")
    t0 = time.monotonic()
    with anyio.fail_after(5):
        await probe_until_answer(tracker, probe, given_up.append)  # returns once it gave up
    assert 0.25 <= time.monotonic() - t0 < 2
    assert len(given_up) == 1
    assert re.fullmatch(r"cannot reach http://127\.0\.0\.1:9/v1 since \d\d:\d\d:\d\d \(0\.3 s\): connection refused",
                        given_up[0]), given_up
    assert stats.outage_since is None


@pytest.mark.anyio
async def test_a_port_that_accepts_but_never_answers_requests_still_times_out():
    """The probe answers, every request fails again: the outage clock does not restart at each probe."""
    policy = OutagePolicy(timeout_s=0.3, first_probe_s=0.01, max_probe_s=0.02)
    tracker = OutageTracker(Gate(), "https://h/v1", policy)
    given_up: list[str] = []

    async def probe() -> bool:
        return True

    async def failing_requests() -> None:
        while True:
            await tracker.gate.wait_open()
            tracker.unreachable("TLS certificate not accepted")
            await anyio.sleep(0.005)

    tracker.heard_from_server()
    tracker.unreachable("TLS certificate not accepted")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(failing_requests)
            await probe_until_answer(tracker, probe, given_up.append)
            tg.cancel_scope.cancel()
    assert len(given_up) == 1 and "TLS certificate not accepted" in given_up[0]


@pytest.mark.anyio
async def test_an_answer_during_the_outage_ends_the_probing_without_a_stop():
    tracker = OutageTracker(Gate(), "http://h/v1", FAST)
    given_up: list[str] = []
    probes = 0

    async def probe() -> bool:
        nonlocal probes
        probes += 1
        if probes == 2:
            tracker.heard_from_server()  # an answer to a request in flight arrived meanwhile
        return False

    tracker.heard_from_server()
    tracker.unreachable("connection refused")
    async with anyio.create_task_group() as tg:
        tg.start_soon(probe_until_answer, tracker, probe, given_up.append)
        with anyio.fail_after(5):
            await tracker.gate.wait_open()
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    assert probes == 2 and not given_up and tracker.current is None


# --- classification: hand-built cause chains ----------------------------------------------------------------

REQ = _httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
CONN_KEY = SimpleNamespace(host="127.0.0.1", port=9, ssl=False, is_ssl=False)


def chain(*excs: BaseException) -> BaseException:
    """excs[0] raised from excs[1] raised from ... (outermost first)."""
    for outer, inner in zip(excs, excs[1:]):
        outer.__cause__ = inner
    return excs[0]


def refused() -> ConnectionRefusedError:
    return ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")


def cert_error() -> ssl.SSLCertVerificationError:
    e = ssl.SSLCertVerificationError(1, "certificate verify failed")
    e.verify_message = "self-signed certificate"
    return e


def plain_ssl_error() -> ssl.SSLError:
    e = ssl.SSLError(1, "wrong version number")
    e.reason = "WRONG_VERSION_NUMBER"
    return e


CHAINS = [
    # the SDK's aiohttp transport: every connection error arrives as APITimeoutError <- httpx ConnectTimeout
    ("aiohttp refused", lambda: chain(openai.APITimeoutError(request=REQ), _httpx.ConnectTimeout("x"),
                                      aiohttp.ClientConnectorError(CONN_KEY, refused()), refused()),
     K.UNREACHABLE, "connection refused"),
    ("aiohttp dns", lambda: chain(openai.APITimeoutError(request=REQ), _httpx.ConnectTimeout("x"),
                                  aiohttp.ClientConnectorDNSError(CONN_KEY, socket.gaierror(-2, "not known")),
                                  socket.gaierror(-2, "Name or service not known")),
     K.UNREACHABLE, "host name not found"),
    ("aiohttp cert", lambda: chain(openai.APITimeoutError(request=REQ), _httpx.ConnectTimeout("x"),
                                   aiohttp.ClientConnectorCertificateError(CONN_KEY, cert_error()), cert_error()),
     K.UNREACHABLE, "TLS certificate not accepted (self-signed certificate)"),
    ("aiohttp tls", lambda: chain(openai.APITimeoutError(request=REQ), _httpx.ConnectTimeout("x"),
                                  aiohttp.ClientConnectorSSLError(CONN_KEY, plain_ssl_error()), plain_ssl_error()),
     K.UNREACHABLE, "TLS handshake failed (WRONG_VERSION_NUMBER)"),
    ("aiohttp no route", lambda: chain(openai.APITimeoutError(request=REQ), _httpx.ConnectTimeout("x"),
                                       aiohttp.ClientConnectorError(CONN_KEY, OSError(errno.EHOSTUNREACH, "x")),
                                       OSError(errno.EHOSTUNREACH, "No route to host")),
     K.UNREACHABLE, "no route to host"),
    ("aiohttp dropped", lambda: chain(openai.APITimeoutError(request=REQ), _httpx.ConnectTimeout("x"),
                                      aiohttp.ServerDisconnectedError()),
     K.CONNECTION, "ServerDisconnectedError"),
    ("aiohttp reset", lambda: chain(openai.APITimeoutError(request=REQ), _httpx.ConnectTimeout("x"),
                                    aiohttp.ClientOSError(errno.ECONNRESET, "reset"),
                                    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")),
     K.CONNECTION, "ConnectionResetError"),
    ("aiohttp read timeout", lambda: chain(openai.APITimeoutError(request=REQ), _httpx.ReadTimeout("x"),
                                           aiohttp.SocketTimeoutError("Timeout on reading data from socket")),
     K.TIMEOUT, "timed out"),
    # the httpx transport
    ("httpx refused", lambda: chain(openai.APIConnectionError(request=REQ), _httpx.ConnectError("x"),
                                    OSError("All connection attempts failed"), refused()),
     K.UNREACHABLE, "connection refused"),
    ("httpx dns", lambda: chain(openai.APIConnectionError(request=REQ), _httpx.ConnectError("x"),
                                socket.gaierror(-2, "Name or service not known")),
     K.UNREACHABLE, "host name not found"),
    ("httpx cert", lambda: chain(openai.APIConnectionError(request=REQ), _httpx.ConnectError("x"), cert_error()),
     K.UNREACHABLE, "TLS certificate not accepted"),
    ("httpx network unreachable", lambda: chain(openai.APIConnectionError(request=REQ), _httpx.ConnectError("x"),
                                                OSError(errno.ENETUNREACH, "Network is unreachable")),
     K.UNREACHABLE, "network is unreachable"),
    ("httpx not a url", lambda: chain(openai.APIConnectionError(request=REQ),
                                      _httpx.UnsupportedProtocol("Request URL is missing a scheme")),
     K.UNREACHABLE, "not an http:// or https:// URL"),
    ("httpx dropped", lambda: chain(openai.APIConnectionError(request=REQ),
                                    _httpx.RemoteProtocolError("Server disconnected")),
     K.CONNECTION, "RemoteProtocolError"),
    ("httpx reset", lambda: chain(openai.APIConnectionError(request=REQ), _httpx.ReadError("x"),
                                  ConnectionResetError(errno.ECONNRESET, "reset")),
     K.CONNECTION, "ConnectionResetError"),
    ("httpx tls error mid-answer", lambda: chain(openai.APIConnectionError(request=REQ), _httpx.ReadError("x"),
                                                 plain_ssl_error()),
     K.CONNECTION, "SSLError"),
    ("httpx connect timeout", lambda: chain(openai.APITimeoutError(request=REQ), _httpx.ConnectTimeout("x"),
                                            TimeoutError()),
     K.TIMEOUT, "timed out"),
    ("httpx read timeout", lambda: chain(openai.APITimeoutError(request=REQ), _httpx.ReadTimeout("x"),
                                         TimeoutError()),
     K.TIMEOUT, "timed out"),
    # ours (anyio.fail_after around the whole call), and bare SDK errors
    ("our deadline", lambda: TimeoutError(), K.TIMEOUT, "timed out"),
    ("bare timeout", lambda: openai.APITimeoutError(request=REQ), K.TIMEOUT, "timed out"),
    ("bare connection", lambda: openai.APIConnectionError(request=REQ), K.CONNECTION, "connection failed"),
]


@pytest.mark.parametrize(("name", "make", "kind", "why"), CHAINS, ids=[c[0] for c in CHAINS])
def test_failure_from_sdk_classifies_by_cause_type(name, make, kind, why):
    failure = failure_from_sdk(make(), KEY)
    assert failure.kind is kind, (name, failure.message)
    assert why in failure.message
    assert failure.status is None


def test_a_chain_that_loops_is_walked_once():
    a, b = openai.APIConnectionError(request=REQ), _httpx.ReadError("x")
    a.__cause__, b.__context__ = b, a
    assert failure_from_sdk(a, KEY).kind is K.CONNECTION


# --- classification: what the real SDK raises ---------------------------------------------------------------

PNG_1PX = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


def request() -> ModelRequest:
    return ModelRequest("a.png", "Describe.", ImagePayload(PNG_1PX, "image/png", 1, 1, 68), "gpt-4o-mini")


async def caption_failure(base_url: str, transport: str, key: str = KEY) -> APIFailure:
    backend = OpenAIBackend(api_key=key, base_url=base_url, timeout=5, max_connections=4, transport=transport)
    try:
        with pytest.raises(APIFailure) as info:
            await backend.caption(request())
        return info.value
    finally:
        await backend.aclose()


async def probe(base_url: str, transport: str, key: str = KEY) -> bool:
    backend = OpenAIBackend(api_key=key, base_url=base_url, timeout=5, max_connections=4, transport=transport)
    try:
        return await backend.reachable()
    finally:
        await backend.aclose()


TRANSPORTS = ["aiohttp", "httpx"]


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_real_sdk_closed_port_is_unreachable_not_a_timeout(transport):
    url = f"http://127.0.0.1:{free_port()}/v1"
    failure = await caption_failure(url, transport)
    assert (failure.kind, failure.message) == (K.UNREACHABLE, "connection refused")
    assert await probe(url, transport) is False


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_real_sdk_tls_with_a_plain_http_port_is_unreachable(server, transport):
    url = server.base_url.replace("http://", "https://")
    failure = await caption_failure(url, transport)
    assert failure.kind is K.UNREACHABLE and failure.message.startswith("TLS handshake failed"), failure.message
    assert await probe(url, transport) is False


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_real_sdk_unresolvable_host_is_unreachable(transport):
    failure = await caption_failure("http://nonexistent.invalid/v1", transport)  # RFC 6761: never resolves
    if failure.kind is K.TIMEOUT:
        pytest.skip("this machine's resolver does not answer for .invalid within the timeout")
    assert (failure.kind, failure.message) == (K.UNREACHABLE, "host name not found")


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_real_sdk_dropped_connection_is_a_connection_error_not_a_timeout(server, transport):
    server.configure(p_drop=1.0)
    failure = await caption_failure(server.base_url, transport)
    assert failure.kind is K.CONNECTION, failure.message


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_probe_counts_any_http_answer(server, transport):
    assert await probe(server.base_url, transport) is True
    assert await probe(server.base_url, transport, key="sk-wrong") is True  # a 401 is an answer too


# --- through the CLI ----------------------------------------------------------------------------------------

@pytest.fixture
def fifty(cli, tmp_path):
    root = make_big_market(tmp_path / "data", n_ids=10, per_id=2)  # 50 images
    return prepare_index(cli, root, tmp_path / "index.json")


def run_args(index: Path, out: Path, prompt: Path, base_url: str, *extra: object) -> list[object]:
    return ["run", "--index", index, "--out", out, "--prompt-file", prompt, "--base-url", base_url,
            "--no-dashboard", *extra]


def error_rows(out: Path) -> list[dict[str, str]]:
    return rows(out / "errors.csv") if (out / "errors.csv").exists() else []


def no_crash(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text and "internal error" not in text, text


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nothing_listening_stops_in_seconds_with_exit_3(cli, api_env, market, prompt_file, tmp_path, transport):
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    res = cli(*run_args(index, out, prompt_file, url, "--http-client", transport))
    elapsed = time.monotonic() - t0
    assert res.code == 3, res.err
    assert elapsed < 5
    assert [line for line in res.err.splitlines() if line.strip()] == [f"error: cannot reach {url}: connection refused"]
    no_crash(res.out, res.err)
    assert error_rows(out) == []  # an outage is not a failure of any image
    assert not (out / "captions_all.csv").exists() or rows(out / "captions_all.csv") == []


def test_server_away_for_seconds_mid_run_every_image_captioned_once_no_attempt_spent(server, fifty, prompt_file,
                                                                                       tmp_path):
    server.configure(latency=0.1)
    out = tmp_path / "out"
    n_images = len(json.loads(fifty.read_text(encoding="utf-8"))["images"])
    proc = spawn(*run_args(fifty, out, prompt_file, server.base_url, "--concurrency", 4, "--max-attempts", 2,
                           "--progress-every", 0.5))
    try:
        before = wait_for_rows(out / "captions_all.csv", 6)
        server.stop()  # in-flight requests are dropped, new connections refused
        time.sleep(2.0)
        server.start()  # same port
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    no_crash(stdout, stderr)
    assert 6 <= before < n_images  # the server really went away mid-run
    assert "server unreachable for" in stdout + stderr and "(connection refused); probing" in stdout + stderr
    by_id = check_captions_belong(fifty, out)
    assert len(by_id) == n_images
    assert error_rows(out) == []
    # a request dropped in flight spends its attempt; refused ones while the server was away do not
    assert all(1 <= int(r["attempts"]) <= 2 for r in by_id.values())


def test_outage_timeout_stops_with_exit_3_and_keeps_what_was_written(server, fifty, prompt_file, tmp_path):
    server.configure(latency=0.1)
    out = tmp_path / "out"
    proc = spawn(*run_args(fifty, out, prompt_file, server.base_url, "--concurrency", 4, "--outage-timeout", 2))
    try:
        before = wait_for_rows(out / "captions_all.csv", 6)
        server.stop()  # for good
        t0 = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3, stderr
    assert 1.5 <= elapsed < 10
    no_crash(stdout, stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert re.fullmatch(rf"error: cannot reach {re.escape(server.base_url)} since \d\d:\d\d:\d\d \(2 s\): "
                        r"connection refused", errors[0]), errors
    assert len(check_captions_belong(fifty, out)) >= before  # rows written before are kept
    assert error_rows(out) == []


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_outage_timeout_must_be_above_zero(cli, api_env, market, prompt_file, tmp_path, value):
    res = cli(*run_args(tmp_path / "index.json", tmp_path / "out", prompt_file, "http://127.0.0.1:9/v1",
                        "--outage-timeout", value))
    assert res.code == 2
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--outage-timeout" in lines[0], res.err
    no_crash(res.out, res.err)


def test_views_show_the_outage():
    from rich.console import Console

    from pipeline.review.dashboard import progress_line, render_dashboard

    stats = RunStats(total=10)
    assert "unreachable" not in progress_line(stats.snapshot())
    stats.outage_since, stats.outage_why = time.monotonic() - 12.2, "connection refused"
    snap = stats.snapshot()
    assert "server unreachable for 12 s (connection refused); probing" in progress_line(snap)
    console = Console(record=True, width=120)
    console.print(render_dashboard(snap))
    assert "server unreachable for 12 s (connection refused); probing" in console.export_text()

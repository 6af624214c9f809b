"""The server against a broken or stale worker: a bad reply is that worker's failure under
the loss policy, never a crash, and every record is kept (no root; loopback, tiny models)."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from specfed import server, wire
from specfed.codecs import TopKCodec
from specfed.engine import LocalWorker
from specfed.messages import VerifyReply, VerifyRequest
from specfed.models import load_model, make_tiny_model
from specfed.worker import WorkerService, _Handler, _Server

V = 64
Mutate = Callable[[VerifyRequest, VerifyReply, "Corrupting"], VerifyReply]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths = {n: root / n for n in ("draft", "w1", "w2")}
    for seed, n in enumerate(paths, start=21):
        make_tiny_model(paths[n], vocab_size=V, seed=seed)
    return paths


class Corrupting(LocalWorker):
    """A real in-process worker whose reply in round `at` (of every request) is mutated."""

    def __init__(self, name: str, lm, mutate: Mutate, at: int = 1) -> None:
        super().__init__(name, lm)
        self.mutate, self.at = mutate, at
        self.first: VerifyReply | None = None

    def verify(self, request: VerifyRequest, arrived: float | None = None) -> VerifyReply:
        reply = super().verify(request, arrived)
        if request.round == 0:
            self.first = reply
        return self.mutate(request, reply, self) if request.round == self.at else reply


@contextlib.contextmanager
def serve(worker: LocalWorker, service_cls: type[WorkerService] = WorkerService) -> Iterator[int]:
    """The real worker service for `worker` on 127.0.0.1 in a thread; yields its port."""
    srv = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=True)
    srv.service = service_cls(worker, wire.DEFAULT_MAX_FRAME, 30.0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def run_server(models, ports: list[int], out: Path, policy: str) -> int:
    return server.main(
        [
            "--draft", str(models["draft"]),
            "--workers", ",".join(f"127.0.0.1:{p}" for p in ports),
            "--transmission", "topk", "--k", "8",
            "--gamma", "3",
            "--prompts", "ids:1,2,3",
            "--max-new-tokens", "12",
            "--dtype", "fp32",
            "--out", str(out),
            "--on-worker-loss", policy,
            "--read-timeout", "10", "--round-timeout", "10",
            "--quiet",
        ]
    )  # fmt: skip


def _payload_with(reply: VerifyReply, edit: Callable[[bytearray], None]) -> VerifyReply:
    data = bytearray(reply.payload)
    edit(data)
    return replace(reply, payload=bytes(data))


def _set_value(value: float) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        struct.pack_into("<f", data, 16, value)  # the first top-K value (fp32, after header)

    return edit


def _index_too_large(data: bytearray) -> None:
    k, p = struct.unpack_from("<I", data, 12)[0], struct.unpack_from("<I", data, 4)[0]
    struct.pack_into("<H", data, 16 + 4 * p * k, V + 5)  # the first index (u16 at V = 64)


def _other_vocab(req: VerifyRequest, reply: VerifyReply, w: Corrupting) -> VerifyReply:
    p = np.full((req.n_positions, V + 1), 1.0 / (V + 1), dtype=np.float32)
    return replace(reply, payload=TopKCodec(k=8).encode(p))


def _fewer_positions(req: VerifyRequest, reply: VerifyReply, w: Corrupting) -> VerifyReply:
    p = np.full((req.n_positions - 1, V), 1.0 / V, dtype=np.float32)
    return replace(reply, payload=TopKCodec(k=8).encode(p))


BAD_REPLIES: dict[str, tuple[Mutate, str]] = {
    "nan": (lambda r, x, w: _payload_with(x, _set_value(math.nan)), "bad reply in round 1"),
    "negative": (lambda r, x, w: _payload_with(x, _set_value(-0.5)), "bad reply"),
    "above one": (lambda r, x, w: _payload_with(x, _set_value(3.0)), "bad reply"),
    "index >= V": (lambda r, x, w: _payload_with(x, _index_too_large), "bad reply"),
    "other V": (_other_vocab, "V=65"),
    "positions": (_fewer_positions, "positions"),
    "stale": (lambda r, x, w: w.first or x, "stale or misrouted"),
    "negative time": (lambda r, x, w: replace(x, t_worker_ms=-1e9), "worker time"),
    "nan time": (lambda r, x, w: replace(x, t_worker_ms=math.nan), "worker time"),
}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("case", list(BAD_REPLIES))
@pytest.mark.parametrize("policy", ["fail", "continue"])
def test_bad_reply_is_a_worker_failure_with_records_kept(models, tmp_path, case, policy):
    mutate, reason = BAD_REPLIES[case]
    good = LocalWorker("w1", load_model(str(models["w1"]), dtype="fp32"))
    bad = Corrupting("w2", load_model(str(models["w2"]), dtype="fp32"), mutate)
    out = tmp_path / "run"
    with serve(good) as p1, serve(bad) as p2:
        status = run_server(models, [p1, p2], out, policy)
    requests = _rows(out / "requests.csv")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    rounds = _rows(out / "rounds.csv")
    assert any(int(r["round"]) == 0 for r in rounds)  # the rounds before the failure are kept
    if policy == "fail":
        assert status == 1
        assert requests and requests[0]["status"] == "error" and reason in requests[0]["events"]
        assert events[0]["event"] == "failed" and "w2" in events[0]["error"]
    else:
        assert status == 0
        assert [r["status"] for r in requests] == ["ok"]
        assert all(int(r["new_tokens"]) == 12 for r in requests)
        assert any("lost w2" in e["event"] and reason in e["event"] for e in events)
        later = [r for r in rounds if r["request_id"] == requests[0]["request_id"]]
        assert {r["worker"] for r in later if int(r["round"]) >= 1} == {"w1"}


class WrongFingerprint(WorkerService):
    """Answers HELLO with HELLO_OK naming another vocabulary (a stale or foreign worker)."""

    def _handshake(self, conn, peer, cid):  # type: ignore[override]
        conn.recv()
        conn.send(wire.MsgType.HELLO_OK, wire.Hello(V, "0" * 16, "impostor", "worker").encode())
        return True


def test_wrong_fingerprint_in_hello_ok_is_a_clear_error(models, tmp_path, capsys):
    w = LocalWorker("w1", load_model(str(models["w1"]), dtype="fp32"))
    with serve(w, WrongFingerprint) as port:
        status = run_server(models, [port], tmp_path / "run", "fail")
    err = capsys.readouterr().err
    assert status == 2 and "another vocabulary" in err and "impostor" in err
    assert "Traceback" not in err


class ShortScore(LocalWorker):
    def score(self, sequence, n_context, temperature):
        return super().score(sequence, n_context, temperature)[:-1]


def test_short_score_reply_keeps_the_row(models, tmp_path):
    w = ShortScore("w1", load_model(str(models["w1"]), dtype="fp32"))
    with serve(w) as port:
        status = run_server(models, [port], tmp_path / "run", "fail")
    requests = _rows(tmp_path / "run" / "requests.csv")
    assert status == 0 and [r["status"] for r in requests] == ["ok"]
    assert all(r["logp_mean"] == "" for r in requests)  # not measured, not made up


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--gamma", "-1"], "gamma"),
        (["--weights", "nan"], "weights"),
        (["--weights", "0.7,0.7"], "weights"),
        (["--transmission", "topk", "--k", "0"], "k"),
        (["--temperature", "nan"], "temperature"),
        (["--transmission", "zip"], "zip"),
        (["--round-timeout", "inf"], "round-timeout"),
    ],
)
def test_bad_command_line_values_are_usage_errors_before_connecting(args, match, capsys, models):
    # port 9 (discard) is never contacted: the values are refused first
    status = server.main(
        ["--draft", str(models["draft"]), "--workers", "127.0.0.1:9", "--out", "/nonexistent",
         "--prompts", "ids:1,2", *args]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and match in err and "Traceback" not in err
    assert "cannot connect" not in err

"""Worker and server processes over real TCP on loopback, with tiny models (no root)."""

from __future__ import annotations

import contextlib
import csv
import os
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from specfed import wire
from specfed.client import RemoteWorker
from specfed.codecs import make_codec
from specfed.engine import FederatedGenerator, LocalWorker, WorkerLost
from specfed.messages import Transmission, VerifyRequest
from specfed.models import ModelError, load_model, make_tiny_model
from specfed.options import Mode
from specfed.records import REQUEST_COLUMNS, ROUND_COLUMNS
from specfed.wire import MsgType
from tests.procs import WorkerProc

V = 32
CONTEXT = [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths = {n: root / n for n in ("draft", "w1", "w2", "other")}
    make_tiny_model(paths["draft"], vocab_size=V, seed=11)
    make_tiny_model(paths["w1"], vocab_size=V, seed=12)
    make_tiny_model(paths["w2"], vocab_size=V, seed=13)
    make_tiny_model(paths["other"], vocab_size=V + 1, seed=14)
    return paths


@pytest.fixture(scope="module")
def workers(models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    procs = [WorkerProc(models[n], logs / f"{n}.log") for n in ("w1", "w2")]
    yield procs
    for p in procs:
        p.stop()
    for p in procs:
        assert p.proc.returncode == 0, p.log.read_text()


@pytest.fixture(scope="module")
def local(models):
    return {n: load_model(str(models[n]), dtype="fp32") for n in ("draft", "w1", "w2")}


def remote(workers, draft, **kw):
    return [RemoteWorker(f"w{i + 1}", p.addr, draft, **kw) for i, p in enumerate(workers)]


CASES = [
    (Transmission(Mode.FULL), "renormalize"),
    (Transmission(Mode.TOPK, k=5), "renormalize"),
    (Transmission(Mode.TOPK, k=5), "residual-mass"),
    (Transmission(Mode.TOPK, k=5), "draft-guided"),
    (Transmission(Mode.ADAPTIVE, k=16, epsilon=0.2), "residual-mass"),
]


@pytest.mark.parametrize(("transmission", "reconstruction"), CASES)
def test_tcp_tokens_equal_in_process(workers, local, transmission, reconstruction):
    kw = dict(
        weights=(0.4, 0.6),
        transmissions=transmission,
        reconstruction=reconstruction,
        gamma=3,
        temperature=1.0,
    )
    inproc = FederatedGenerator(
        local["draft"], [LocalWorker("w1", local["w1"]), LocalWorker("w2", local["w2"])], **kw
    )
    clients = remote(workers, local["draft"])
    try:
        tcp = FederatedGenerator(local["draft"], clients, parallel=True, **kw)
        for seed in range(3):
            a = inproc.generate(CONTEXT, 20, seed=seed)
            b = tcp.generate(CONTEXT, 20, seed=seed)
            assert a.tokens == b.tokens
            assert [r.n_accepted for r in a.rounds] == [r.n_accepted for r in b.rounds]
    finally:
        for c in clients:
            c.close()


def test_bytes_on_the_wire_match_the_formula(workers, local):
    """Every round's bytes equal the documented frame formulas, and the socket counters
    agree with the records (plus the END frame)."""
    clients = remote(workers, local["draft"])
    try:
        gen = FederatedGenerator(
            local["draft"],
            clients,
            transmissions=Transmission(Mode.TOPK, k=5),
            gamma=3,
            parallel=True,
        )
        sent0 = [c.conn.bytes_sent for c in clients]
        recv0 = [c.conn.bytes_received for c in clients]
        res = gen.generate(CONTEXT, 12, seed=1, request_id="bytes-test")
        codec = make_codec("topk", k=5)
        for r in res.rounds:
            # first round: the prompt + drafts; later: the emitted token + drafts
            n_tokens = (len(CONTEXT) if r.round == 0 else 1) + r.n_drafted
            for w in r.workers:
                assert w.bytes_up == wire.reply_frame_bytes(
                    codec.encoded_size(r.n_drafted + 1, V), "bytes-test"
                )
                assert w.bytes_down == wire.verify_frame_bytes("bytes-test", n_tokens)
        end_frame = wire.FRAME_OVERHEAD + 2 + len("bytes-test")
        for i, c in enumerate(clients):
            rows = [r.workers[i] for r in res.rounds]
            assert c.conn.bytes_sent - sent0[i] == sum(w.bytes_down for w in rows) + end_frame
            assert c.conn.bytes_received - recv0[i] == sum(w.bytes_up for w in rows)
    finally:
        for c in clients:
            c.close()


def test_vocabulary_mismatch_refused_at_handshake(workers, models):
    other = load_model(str(models["other"]), dtype="fp32")
    with pytest.raises(ModelError, match=r"(?s)vocabulary mismatch.*other.*w1"):
        RemoteWorker("w1", workers[0].addr, other)


def _raw(addr):
    s = socket.create_connection(addr, timeout=5)
    s.settimeout(5)
    return s


def _read_frame(sock):
    conn = wire.Connection(sock)
    return conn.recv(time.monotonic() + 5)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # not our magic
        struct.pack(">I4sBBH", 8, b"SPFD", 99, 1, 0),  # wrong version
        struct.pack(">I4sBBH", 8, b"SPFD", wire.PROTOCOL_VERSION, 77, 0),  # unknown type
        struct.pack(
            ">I4sBBH", 0x7FFFFFF0, b"SPFD", wire.PROTOCOL_VERSION, 1, 0
        ),  # 2 GB frame: refused unread
        wire.frame(MsgType.HELLO, b"\x01\x02"),  # truncated body
        wire.frame(MsgType.VERIFY, b""),  # VERIFY before HELLO
    ],
)
def test_bad_frames_get_an_error_and_the_worker_keeps_serving(workers, local, garbage):
    s = _raw(workers[0].addr)
    s.sendall(garbage)
    kind, body, _ = _read_frame(s)
    assert kind == MsgType.ERROR
    _code, msg = wire.decode_error(body)
    assert msg
    # then the worker closes the connection (RST if our garbage is still unread)
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(1) == b""
    s.close()
    # and still serves a good client
    c = RemoteWorker("w1", workers[0].addr, local["draft"])
    gen = FederatedGenerator(local["draft"], [c], gamma=2)
    assert len(gen.generate(CONTEXT, 4, seed=0).tokens) == 4
    c.close()


def test_malformed_verify_after_handshake(workers, local):
    c = RemoteWorker("w1", workers[1].addr, local["draft"])
    body = bytearray(wire.encode_verify(VerifyRequest("x", 0, [1, 2, 3], 2, 1.0, Transmission())))
    body[-4:] = struct.pack("<I", V + 100)  # token id out of range
    c.conn.send(MsgType.VERIFY, bytes(body))
    kind, body2, _ = c.conn.recv(time.monotonic() + 5)
    assert kind == MsgType.ERROR and "token id" in wire.decode_error(body2)[1]
    c.close()


def test_worker_killed_mid_request_fail_and_continue(models, local, tmp_path):
    """--exit-after makes a worker die abruptly on its 4th round (a crash, no goodbye)."""
    for policy in ("fail", "continue"):
        dying = WorkerProc(models["w2"], tmp_path / f"dying-{policy}.log", "--exit-after", "3")
        steady = WorkerProc(models["w1"], tmp_path / f"steady-{policy}.log")
        try:
            clients = [
                RemoteWorker("w1", steady.addr, local["draft"], read_timeout_s=10),
                RemoteWorker("w2", dying.addr, local["draft"], read_timeout_s=10),
            ]
            gen = FederatedGenerator(
                local["draft"], clients, (0.25, 0.75), gamma=2, parallel=True, on_worker_loss=policy
            )
            kept = []
            if policy == "fail":
                with pytest.raises(WorkerLost, match="w2"):
                    gen.generate(CONTEXT, 30, seed=0, on_round=kept.append)
                assert len(kept) == 3  # every round before the loss was recorded
            else:
                res = gen.generate(CONTEXT, 30, seed=0, on_round=kept.append)
                assert len(res.tokens) == 30 and len(kept) == len(res.rounds) > 3
                assert "lost" in res.events[0] and "w1=1.000" in res.events[0]
                assert [w.worker for w in res.rounds[-1].workers] == ["w1"]
            for c in clients:
                c.close()
        finally:
            dying.stop()
            steady.stop()
        assert dying.proc.returncode == 3


def _read_csv(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_server_cli_sweep_records_and_summary(workers, models, tmp_path):
    out = tmp_path / "run"
    addrs = ",".join(f"127.0.0.1:{p.port}" for p in workers)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "specfed.server",
            "--draft",
            str(models["draft"]),
            "--workers",
            addrs,
            "--weights",
            "0.5,0.5",
            "--transmission",
            "full,topk",
            "--k",
            "4,8",
            "--reconstruction",
            "renormalize,draft-guided",
            "--gamma",
            "3",
            "--prompts",
            "ids:1,2,3",
            "--max-new-tokens",
            "10",
            "--seed",
            "5",
            "--dtype",
            "fp32",
            "--out",
            str(out),
            "--tag",
            "w1_bw_mbit=20",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    rounds, requests = _read_csv(out / "rounds.csv"), _read_csv(out / "requests.csv")
    assert list(rounds[0]) == [*ROUND_COLUMNS, "w1_bw_mbit"]
    assert list(requests[0]) == [*REQUEST_COLUMNS, "w1_bw_mbit"]
    assert len(requests) == 1 + 2 * 2  # full + topk x {4, 8} x 2 reconstructions
    assert {r["status"] for r in requests} == {"ok"}
    assert all(int(r["new_tokens"]) == 10 for r in requests)
    assert {r["worker"] for r in rounds} == {"w1", "w2"}
    assert all(float(r["t_net_ms"]) >= 0 and int(r["bytes_up"]) > 0 for r in rounds)
    assert "ms_per_token" in proc.stdout and "topk8 draft-guided" in proc.stdout


def test_server_cli_keeps_records_when_a_worker_dies(models, tmp_path):
    dying = WorkerProc(models["w2"], tmp_path / "d.log", "--exit-after", "5")
    steady = WorkerProc(models["w1"], tmp_path / "s.log")
    out = tmp_path / "run"
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "specfed.server",
                "--draft",
                str(models["draft"]),
                "--workers",
                f"127.0.0.1:{steady.port},127.0.0.1:{dying.port}",
                "--gamma",
                "2",
                "--prompts",
                "ids:1,2,3",
                "--max-new-tokens",
                "40",
                "--dtype",
                "fp32",
                "--read-timeout",
                "10",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        dying.stop()
        steady.stop()
    assert proc.returncode == 1 and "w2" in proc.stderr
    rounds = _read_csv(out / "rounds.csv")
    assert len(rounds) == 2 * 5  # five complete rounds, both workers
    req = _read_csv(out / "requests.csv")
    assert req[0]["status"] == "error" and "w2" in req[0]["events"]
    assert "w2" in (out / "events.jsonl").read_text()


def test_score_over_tcp_equals_in_process(workers, local):
    """The fidelity score (log-probability under the exact ensemble) is the same whether
    the workers are remote or in this process, and matches the mixture computed directly."""
    from specfed.engine import ensemble_logp, mixture

    kw = dict(weights=(0.4, 0.6), gamma=3, temperature=0.9)
    inproc = FederatedGenerator(
        local["draft"], [LocalWorker("w1", local["w1"]), LocalWorker("w2", local["w2"])], **kw
    )
    clients = remote(workers, local["draft"])
    try:
        tcp = FederatedGenerator(local["draft"], clients, parallel=True, **kw)
        res = tcp.generate(CONTEXT, 8, seed=4)
        got = tcp.score(CONTEXT, res.tokens)
        assert got == pytest.approx(inproc.score(CONTEXT, res.tokens), abs=1e-6)
        ctx, direct = list(CONTEXT), []
        for tok in res.tokens:
            direct.append(mixture([local["w1"], local["w2"]], (0.4, 0.6), ctx, 0.9)[tok])
            ctx.append(tok)
        assert got == pytest.approx(float(np.mean(np.log(direct))), abs=1e-5)
        assert ensemble_logp([np.array([0.5]), np.array([0.1])], [0.5, 0.5]) == pytest.approx(
            np.log(0.3)
        )
    finally:
        for c in clients:
            c.close()


def test_waiting_for_all_multiplexes_and_keeps_warm_without_changing_tokens(workers, local):
    """Remote workers and wait-for-all: one select() loop in the server's thread (no worker
    threads); keeping the critical path warm while waiting changes no token."""
    kw = dict(transmissions=Transmission(Mode.TOPK, k=5), gamma=3, weights=(0.4, 0.6))
    inproc = FederatedGenerator(
        local["draft"], [LocalWorker("w1", local["w1"]), LocalWorker("w2", local["w2"])], **kw
    )
    clients = remote(workers, local["draft"])
    try:
        tcp = FederatedGenerator(local["draft"], clients, parallel=True, keep_warm_ms=0.5, **kw)
        assert tcp.multiplexed and tcp.lanes is None
        for seed in range(2):
            res = tcp.generate(CONTEXT, 16, seed=seed)
            assert res.tokens == inproc.generate(CONTEXT, 16, seed=seed).tokens
            for r in res.rounds:
                assert all(w.t_call_ms >= w.t_worker_ms for w in r.workers)
    finally:
        for c in clients:
            c.close()


def test_a_worker_silent_past_its_round_timeout_is_lost_in_the_select_loop(models, local, tmp_path):
    """A worker that answers 2 s late, with a 0.5 s round timeout: lost at its call deadline
    (not after its reply), and the loss policy goes on with the other worker."""
    slow = WorkerProc(models["w2"], tmp_path / "slow.log", "--delay-ms", "2000")
    fast = WorkerProc(models["w1"], tmp_path / "fast.log")
    clients = [
        RemoteWorker("w1", fast.addr, local["draft"], round_timeout_s=0.5),
        RemoteWorker("w2", slow.addr, local["draft"], round_timeout_s=0.5),
    ]
    try:
        gen = FederatedGenerator(
            local["draft"], clients, gamma=2, parallel=True, on_worker_loss="continue"
        )
        assert gen.multiplexed
        t0 = time.monotonic()
        res = gen.generate(CONTEXT, 6, seed=0)
        first_round_s = res.rounds[0].t_round_ms / 1e3
        assert 0.45 < first_round_s < 1.5, first_round_s  # the deadline, not the 2 s reply
        assert len(res.tokens) == 6 and time.monotonic() - t0 < 10
        assert "lost w2" in res.events[0] and "TimeoutError" in res.events[0]
        assert all([w.worker for w in r.workers] == ["w1"] for r in res.rounds)
    finally:
        for c in clients:
            c.close()
        slow.stop()
        fast.stop()


def test_the_select_loop_sends_to_the_slowest_worker_first(models, local, tmp_path):
    """The round waits for its slowest worker: from the second round on, its request goes
    out first (by each worker's last call), before the sends to the others."""
    slow = WorkerProc(models["w1"], tmp_path / "slow.log", "--delay-ms", "150")
    fast = WorkerProc(models["w2"], tmp_path / "fast.log")
    order: list[str] = []

    class Recorded(RemoteWorker):
        def send_verify(self, request):
            order.append(self.name)
            super().send_verify(request)

    clients = [Recorded("w1", slow.addr, local["draft"]), Recorded("w2", fast.addr, local["draft"])]
    try:
        gen = FederatedGenerator(local["draft"], clients, gamma=2, parallel=True)
        assert gen.multiplexed
        res = gen.generate(CONTEXT, 8, seed=0)
        assert len(res.rounds) >= 2
        firsts = order[::2]
        assert firsts[0] == "w1" and set(firsts[1:]) == {"w1"}, order  # w1: the slow one
        clients.reverse()  # index order no longer slowest first: the last calls decide
        order.clear()
        gen = FederatedGenerator(local["draft"], clients, gamma=2, parallel=True)
        gen.generate(CONTEXT, 8, seed=0)
        firsts = order[::2]
        assert firsts[0] == "w2" and set(firsts[1:]) == {"w1"}, order
    finally:
        for c in clients:
            c.close()
        slow.stop()
        fast.stop()

"""Data at scale: what a prepare costs, and what training from prepared shards costs against data in memory.

    python bench/data_scale.py                                   # all parts; writes bench/results/data_scale.json
    python bench/data_scale.py --quick --out /tmp/data_scale_quick.json          # a few minutes: a smoke test
    python bench/data_scale.py --parts train --sizes-mb 10 --steps 500           # one size, training only
    python bench/data_scale.py --parts prepare --sizes-mb 10 100 1000 --keep --work /tmp/ds
    python bench/data_scale.py --parts images --cifar ../shared/datasets/cifar10 --image-model resnet20

Every prepare and every training run is its own subprocess (`python -m codistill.run` / the prepare CLI)
with its own local Ray (RAY_ADDRESS is removed from its environment); the benchmark itself never joins a
cluster as a driver. The commands are in the JSON, each with its job file.

prepare (text): corpora of `--sizes-mb` MB (10^6 bytes) are made from `--corpus` (default
`../shared/datasets/tinyshakespeare/input.txt` beside the repo; words drawn with numpy where it is missing)
by repetition with variation: each repetition shuffles the lines (a seeded RNG per repetition) and puts a
random word of the corpus's vocabulary in place of one word in 2% of the lines, so no two repetitions are
byte-identical. Each corpus is prepared with the byte tokenizer (`data.max_chars: null`) three times, into
a fresh folder each time (a re-run on the same sources does nothing): in process (`--local`), and with Ray
Data on a fresh local Ray of 1 and of 2 CPUs (`--prepare-cpus`; `python -c` starts
`ray.init(address="local", num_cpus=N)` and then calls `codistill.prepare.cli.main`, as the CLI has no
CPU flag). `prepare s` is the time of `cli.main` alone (Ray Data's start-up and the manifest included; the
interpreter, the imports and `ray.init` not; corpus generation not). `tokens/s` = (train + test tokens of
the manifest) / prepare s. Input shards are `--shard-mb` MiB; by default size/8 between 0.25 and 64 (the
CLI's default), so even a small corpus has 8 chunks for the CPUs to share (images: 8 x the Parquet bytes,
about their decoded size, over 8). The JSON has each prepare's driver peak RSS too. Without the `prepare`
part, `train` still prepares each corpus once (Ray, the most CPUs) and marks that row `for_training`.

train (text): per size, two `gpt-tiny` peers (seeds differ), lockstep logits exchange, `--steps` steps
(one round: eval_every = steps), batch 16 of 64 tokens, `data.limit_test: 256`, engine ray on the CPU,
`resources.num_cpus: 1` per peer (one torch thread each), tracking off. Loaders:
  in-memory: `data.train` = the corpus .txt: tokenized in the driver and `ray.put` once; only up to
             `--in-memory-max-mb` (default 100; larger rows say "skipped: does not fit");
  prepared:  `data.train` = the folder the Ray prepare at the most CPUs wrote (read lazily by each peer).

images: CIFAR-10 from `--cifar` (Hugging Face image Parquet), prepared the same three ways (`images/s`),
then two `--image-model` peers (default `cnn`: 200 steps of batch 64 take well under 2 minutes on 2 CPUs;
`resnet20` about twice as long), in-memory (`data.name: parquet`, decoded in the driver) against prepared.
`--quick` (and `--cifar-rows`) first copies the first rows of each file into the work folder.

Each training row is the median of `--repeats` runs (3) by samples/s, with every run's figure in the JSON.

--quick: corpora of 1 and 3 MB, 30 steps, one run per row, the first 2,000 / 500 CIFAR rows (`data.limit_train: 2000`,
`data.limit_test: 500`); anything given explicitly stays.

Figures of a training run (measured from this process while the run goes on, every `--poll-s` s):
  peak RSS (MiB): `VmHWM` of /proc/<pid>/status (the process's own peak resident set, shared pages mapped
      from the object store included), the last value read before the process ended. `driver` is the
      `python -m codistill.run` process; `peer0`/`peer1` are the processes below it (walked through
      /proc/<pid>/task/*/children) whose command line is `ray::PeerActor...` (the peer actor class of
      codistill/engine/peer_actor.py), numbered in the order they appeared (a peer's index is not in its
      process title). The JSON also has each process's largest `RssAnon` (private memory) and `RssShmem`
      (pages of the object store it has touched) and every other process of the tree (raylet, GCS, board).
  object store (MiB), start / peak: `object_store_bytes_used` of the run's raylet (GetNodeStats through
      `ray._private.internal_api.node_stats`, what `ray memory --stats-only` asks), its GCS address read from
      the command line of the raylet below the driver, so another cluster on the machine is never read (this
      process sets RAY_AUTH_MODE=token, unless set, so that Ray's client finds the local token itself).
      start: the first reading once a peer process exists (the in-memory data set and the actors' arguments,
      before any logits); peak: the largest reading, which holds the exchanged logits too: the board keeps a
      shard until every consumer has a checkpoint past it (round ends here), about 1 MiB per peer and step
      for gpt-tiny (16 x 64 x 256 float32).
  samples/s: from the run's summary.json, each peer's `samples_per_s` (its steps x batch / its busy time:
      training steps and exchange waits, not evaluation, start-up or checkpoints), summed over the peers.
Targets (PASS/FAIL beside them, never asserted): the prepared loader's peak RSS per peer process grows by at
most 20% from the smallest to the largest corpus; prepared samples/s >= 0.95 x in-memory on the smallest
corpus, and on the images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 1
DEFAULT_CORPUS = ROOT.parent / "shared" / "datasets" / "tinyshakespeare" / "input.txt"
DEFAULT_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10"
PEER_TITLE = "ray::PeerActor"  # setproctitle of codistill.engine.peer_actor.PeerActor (ray.remote(PeerActor))
BOARD_TITLE = "ray::RayBoardActor"  # codistill.exchange.ray_board.RayBoardActor
MIB = 1 << 20
KIB = 1024

PREPARE_WRAPPER = """\
import json, sys, time
cpus, timing, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
if cpus > 0:
    import ray
    ray.init(address="local", num_cpus=cpus, include_dashboard=False)
import codistill.prepare.pipeline  # imported before the clock starts
from codistill.prepare.cli import main
t0 = time.perf_counter()
rc = main(argv)
with open(timing, "w") as f:
    json.dump({"rc": rc, "prepare_s": time.perf_counter() - t0}, f)
sys.exit(rc)
"""


# --- processes ------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def _children_by_stat() -> dict[int, list[int]]:
    """ppid -> pids from /proc/*/stat (where the kernel has no /proc/<pid>/task/<tid>/children)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


HAVE_CHILDREN_FILE = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def descendants(root: int) -> list[int]:
    by_stat = None if HAVE_CHILDREN_FILE else _children_by_stat()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = _children(pid) if by_stat is None else by_stat.get(pid, [])
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem in KiB ({} once the process is gone or a zombie)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        return {}
    return out


def _role(pid: int, root: int, argv: list[str]) -> str:
    title = " ".join(argv)
    if pid == root:
        return "driver"
    if title.startswith(PEER_TITLE):
        return "peer"
    if title.startswith(BOARD_TITLE):
        return "board"
    if argv and argv[0].endswith("/raylet"):
        return "raylet"
    if argv and argv[0].endswith("/gcs_server"):
        return "gcs"
    if title.startswith("ray::"):
        return "ray worker"
    return "other"


class ObjectStore:
    """Object store usage of one local cluster: its raylet's GetNodeStats (what `ray memory --stats-only`
    asks), found through the GCS address on that raylet's command line."""

    def __init__(self, gcs_address: str):
        self.gcs_address = gcs_address
        self.node: tuple[str, int] | None = None
        self.state: Any = None
        self.error: str | None = None

    def read(self) -> dict[str, int] | None:
        from ray._private.internal_api import get_state_from_address, node_stats

        if self.node is None:
            if self.state is None:
                self.state = get_state_from_address(self.gcs_address)
            alive = [n for n in self.state.node_table() if n["Alive"]]
            if not alive:
                return None
            self.node = (alive[0]["NodeManagerAddress"], int(alive[0]["NodeManagerPort"]))
        stats = node_stats(self.node[0], self.node[1], include_memory_info=False).store_stats
        return {
            "bytes_used": int(stats.object_store_bytes_used),
            "bytes_primary_copy": int(stats.object_store_bytes_primary_copy),
            "objects": int(stats.num_local_objects),
            "cumulative_created_bytes": int(stats.cumulative_created_bytes),
            "spilled_bytes": int(getattr(stats, "spilled_bytes_total", 0)),
        }

    def close(self) -> None:
        if self.state is not None:
            with contextlib.suppress(Exception):
                self.state.disconnect()


class TreeMonitor(threading.Thread):
    """Every `interval` s: the processes below `root` (peak RSS each) and its cluster's object store."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.procs: dict[int, dict[str, Any]] = {}
        self.raylet: int | None = None
        self.store: ObjectStore | None = None
        self.store_peak: dict[str, int] = {}
        self.store_last: dict[str, int] = {}
        self.store_samples = 0
        self.store_at_peer_start: dict[str, int] | None = None
        self.store_error: str | None = None
        self.t0 = time.perf_counter()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        if self.store is not None:
            self.store.close()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.sample()
            except Exception as e:  # a sampling bug must not end the run it measures
                self.store_error = self.store_error or f"monitor: {type(e).__name__}: {e}"
            self._halt.wait(self.interval)

    def sample(self) -> None:
        now = time.perf_counter() - self.t0
        for pid in [self.root, *descendants(self.root)]:
            rec = self.procs.get(pid)
            if rec is None or rec["role"] not in ("driver", "peer", "board", "raylet", "gcs"):
                argv = _cmdline(pid)  # a worker's title changes when it becomes an actor
                if not argv:
                    continue
                role = _role(pid, self.root, argv)
                if rec is None:
                    rec = self.procs[pid] = {"pid": pid, "first_s": now, "hwm_kib": 0, "anon_kib": 0, "shmem_kib": 0}
                rec.update(role=role, cmd=" ".join(argv)[:160])
                if role == "raylet" and self.raylet is None:
                    self.raylet = pid
                    gcs = next((a.split("=", 1)[1] for a in argv if a.startswith("--gcs-address=")), None)
                    if gcs:
                        self.store = ObjectStore(gcs)
            st = _status(pid)
            if not st:
                continue
            rec["hwm_kib"] = max(rec["hwm_kib"], st.get("VmHWM", 0))
            rec["anon_kib"] = max(rec["anon_kib"], st.get("RssAnon", 0))
            rec["shmem_kib"] = max(rec["shmem_kib"], st.get("RssShmem", 0))
            rec["last_s"] = now
        if self.store is not None and self.raylet is not None and os.path.exists(f"/proc/{self.raylet}/status"):
            try:
                got = self.store.read()
            except Exception as e:  # the cluster is starting or going away
                self.store_error = f"{type(e).__name__}: {str(e)[:200]}"
                return
            if got is not None:
                self.store_samples += 1
                self.store_last = got
                if self.store_at_peer_start is None and any(r["role"] == "peer" for r in self.procs.values()):
                    self.store_at_peer_start = got  # the data set and the actors' arguments; no logits yet
                for k, v in got.items():
                    self.store_peak[k] = max(self.store_peak.get(k, 0), v)

    def report(self) -> dict[str, Any]:
        procs = sorted(self.procs.values(), key=lambda r: (r["first_s"], r["pid"]))
        peers = [r for r in procs if r["role"] == "peer"]
        driver = self.procs.get(self.root, {})

        def mib(kib: int | None) -> float | None:
            return None if not kib else kib / KIB

        return {
            "driver_peak_mib": mib(driver.get("hwm_kib")),
            "peer_peak_mib": [mib(p["hwm_kib"]) for p in peers],
            "peer_anon_peak_mib": [mib(p["anon_kib"]) for p in peers],
            "peer_shmem_peak_mib": [mib(p["shmem_kib"]) for p in peers],
            "board_peak_mib": [mib(p["hwm_kib"]) for p in procs if p["role"] == "board"],
            "object_store_peak_mib": self.store_peak["bytes_used"] / MIB if self.store_peak else None,
            "object_store_peak": self.store_peak or None,
            "object_store_at_peer_start_mib": None
            if self.store_at_peer_start is None
            else self.store_at_peer_start["bytes_used"] / MIB,
            "object_store_last": self.store_last or None,
            "object_store_samples": self.store_samples,
            "object_store_note": None
            if self.store_samples
            else (
                self.store_error or ("no raylet below the driver (joined another cluster?)" if not self.raylet else "")
            ),
            "processes": [
                {
                    "pid": p["pid"],
                    "role": p["role"],
                    "cmd": p["cmd"],
                    "peak_mib": mib(p["hwm_kib"]),
                    "anon_peak_mib": mib(p["anon_kib"]),
                    "shmem_peak_mib": mib(p["shmem_kib"]),
                    "seen_s": [round(p["first_s"], 2), round(p.get("last_s", p["first_s"]), 2)],
                }
                for p in procs
            ],
        }


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray in every subprocess
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def run_monitored(cmd: list[str], log: Path, poll_s: float, timeout_s: float) -> dict[str, Any]:
    """Run `cmd` (cwd: the repo) with its output in `log`, watching its process tree."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        mon = TreeMonitor(proc.pid, poll_s)
        mon.start()
        try:
            rc: int | str = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(2)  # SIGINT: the driver shuts its Ray down
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = "timeout"
        finally:
            mon.stop()
    wall = time.perf_counter() - t0
    res = {"rc": rc, "wall_s": wall, "log": str(log), **mon.report()}
    if rc != 0:
        res["log_tail"] = log.read_text(errors="replace")[-3000:]
    return res


def _q(a: str) -> str:
    import shlex

    return shlex.quote(a)


def show(cmd: list[str]) -> str:
    shown = ["python" if i == 0 and a == sys.executable else a for i, a in enumerate(cmd)]
    return " ".join(_q(a) for a in shown)


# --- corpora --------------------------------------------------------------------------------------------


def base_lines(corpus: Path | None) -> tuple[list[str], str]:
    if corpus is not None and corpus.is_file():
        return corpus.read_text(encoding="utf-8", errors="replace").splitlines(), str(corpus)
    import numpy as np

    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    p = 1 / np.arange(1, 27)
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(1, 10)), p=p / p.sum())) for _ in range(5000)]
    zipf = 1 / np.arange(1, len(vocab) + 1)
    words = rng.choice(len(vocab), size=400_000, p=zipf / zipf.sum())
    lens = rng.integers(3, 13, size=60_000)
    lines, i = [], 0
    for n in lens:
        lines.append(" ".join(vocab[w] for w in words[i : i + n]))
        i = (i + n) % (len(words) - 13)
    return lines, "generated (numpy words: 5,000 Zipf-distributed)"


def make_corpus(lines: list[str], size_bytes: int, path: Path, seed: int = 0) -> dict[str, Any]:
    """`size_bytes` of `lines` repeated, each repetition shuffled and 2% of its lines with one word replaced."""
    import numpy as np

    t0 = time.perf_counter()
    arr = np.array(lines, dtype=object)
    vocab = sorted({w for line in lines for w in line.split()}) or ["word"]
    written, rep = 0, 0
    with open(path, "wb") as f:
        while written < size_bytes:
            rng = np.random.default_rng([seed, rep])
            shuffled = arr[rng.permutation(len(arr))].tolist()
            k = max(1, len(shuffled) // 50)
            where, pos, word = (
                rng.choice(len(shuffled), size=k, replace=False),
                rng.random(k),
                rng.integers(len(vocab), size=k),
            )
            for i, x, w in zip(where, pos, word):
                words = shuffled[i].split(" ")
                words[int(x * len(words))] = vocab[w]
                shuffled[i] = " ".join(words)
            data = ("\n".join(shuffled) + "\n").encode("utf-8")
            rep += 1
            if written + len(data) > size_bytes:  # the last repetition ends at the line before the size
                cut = data.rfind(b"\n", 0, size_bytes - written)
                data = data[: cut + 1] if cut >= 0 else data[: size_bytes - written]
                f.write(data)
                written += len(data)
                break
            f.write(data)
            written += len(data)
    return {"path": str(path), "bytes": written, "repetitions": rep, "gen_s": time.perf_counter() - t0}


def cifar_subset(src: Path, dst: Path, rows: tuple[int, int]) -> Path:
    """The first rows of train.parquet and test.parquet (schema and its metadata kept) in `dst`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dst.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", rows[0]), ("test", rows[1])):
        pf = pq.ParquetFile(src / f"{name}.parquet")
        batch = next(pf.iter_batches(batch_size=n))
        pq.write_table(pa.Table.from_batches([batch], schema=pf.schema_arrow), dst / f"{name}.parquet")
    return dst


# --- jobs -----------------------------------------------------------------------------------------------


def write_yaml(path: Path, job: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def text_data(train: str) -> dict[str, Any]:
    return {"name": "text", "train": train, "tokenizer": "byte", "max_chars": None, "block_size": 64}


def image_data(train: str, test: str | None) -> dict[str, Any]:
    return {"name": "parquet", "train": train, **({"test": test} if test else {})}


def train_job(kind: str, data: dict[str, Any], args) -> dict[str, Any]:
    steps = args.steps
    if kind == "text":
        model = "gpt-tiny"
        data = {**data, "batch_size": 16, "eval_batch_size": 256, "limit_test": args.text_limit_test}
        optim = {"name": "adamw", "lr": 0.003, "weight_decay": 0.0, "schedule": "constant"}
        loss = {"divergence": "kl", "temperature": 1.0, "alpha": 0.3}
    else:
        model = args.image_model
        data = {**data, "batch_size": 64, "eval_batch_size": 500, "limit_test": args.image_limit_test}
        if args.cifar_rows:
            data["limit_train"] = args.cifar_rows[0]
        optim = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "constant"}
        loss = {"divergence": "kl", "temperature": 3.0, "alpha": 0.5}
    return {
        "name": f"bench-data-scale-{kind}",
        "seed": 0,
        "steps": steps,
        "eval_every": steps,
        "engine": "ray",
        "device": "cpu",
        "data": data,
        "optim": optim,
        "peers": [{"model": model}, {"model": model, "seed": 1}],
        "loss": loss,
        "exchange": {"mode": "logits", "staleness": 0},
        "resources": {"num_cpus": 1},
        "tracking": {"backend": "none"},
    }


# --- the parts ------------------------------------------------------------------------------------------


def read_manifest(out: Path) -> dict[str, Any]:
    m = json.loads((out / "manifest.json").read_text())
    return {
        "train": int(m["splits"]["train"]["count"]),
        "test": int(m["splits"]["test"]["count"]),
        "shards": sum(len(s["shards"]) for s in m["splits"].values()),
    }


def prepare_once(job: Path, out: Path, cpus: int, shard_mb: float, unit: str, work: Path, args) -> dict[str, Any]:
    """One prepare into a fresh folder: cpus 0 = `--local` (in process), else Ray Data on `cpus` CPUs."""
    if out.exists():
        shutil.rmtree(out)
    timing = work / "logs" / f"{out.name}.timing.json"
    cli = ["--config", str(job), "--out", str(out), "--shard-mb", f"{shard_mb:g}", *(["--local"] if not cpus else [])]
    cmd = [sys.executable, "-c", PREPARE_WRAPPER, str(cpus), str(timing), *cli]
    res = run_monitored(cmd, work / "logs" / f"{out.name}.log", args.poll_s, args.timeout_s)
    row: dict[str, Any] = {
        "runner": "local" if not cpus else "ray",
        "cpus": cpus or 1,
        "shard_mb": shard_mb,
        "out": str(out),
        "command": 'python -c "$PREPARE_WRAPPER" ' + " ".join(_q(a) for a in cmd[3:]),
        "argv": cmd,
        "cli": "python -m codistill.prepare " + " ".join(_q(a) for a in cli),
        "wall_s": res["wall_s"],
        "driver_peak_mib": res["driver_peak_mib"],
        "object_store_peak_mib": res["object_store_peak_mib"],
        "rc": res["rc"],
    }
    if res["rc"] != 0 or not timing.exists():
        row["error"] = res.get("log_tail", "no timing written")
        print(f"    FAILED ({res['rc']}); log {res['log']}:\n{row['error'][-1500:]}", flush=True)
        return row
    t = json.loads(timing.read_text())
    counts = read_manifest(out)
    row.update(prepare_s=t["prepare_s"], **counts)
    row[f"{unit}_per_s"] = (counts["train"] + counts["test"]) / t["prepare_s"]
    return row


def prepare_all(job: Path, label: str, unit: str, shard_mb: float, work: Path, args) -> tuple[list[dict], Path | None]:
    """Local, then Ray at each of --prepare-cpus; keeps the last good folder (the most CPUs) for training."""
    rows, kept = [], None
    for cpus in [0, *args.prepare_cpus]:
        out = work / "prepared" / f"{slug(label)}-{'local' if not cpus else f'ray{cpus}'}"
        row = prepare_once(job, out, cpus, shard_mb, unit, work, args)
        row["data"] = label
        rows.append(row)
        how = "local (in process)" if not cpus else f"ray @{cpus} CPU{'s' if cpus > 1 else ''}"
        if "error" not in row:
            print(
                f"  prepare {label:<12} {how:<20} {row['prepare_s']:7.2f} s  {row[f'{unit}_per_s']:>12,.0f} {unit}/s  "
                f"({row['train'] + row['test']:,} {unit}, {row['shards']} shards; "
                f"driver {row['driver_peak_mib'] or 0:,.0f} MiB)",
                flush=True,
            )
            if kept is not None and kept != out:
                shutil.rmtree(kept, ignore_errors=True)  # one prepared copy at a time on disk
            kept = out
        else:
            shutil.rmtree(out, ignore_errors=True)
    return rows, kept


def train_once(kind: str, label: str, loader: str, data: dict[str, Any], work: Path, args) -> dict[str, Any]:
    """`--repeats` runs of the job: the row of the median samples/s, with every run's samples/s and the largest
    peak RSS of each process over the runs (one 200-step run on 2 shared cores varies by several percent)."""
    rows = [_train_run(kind, label, loader, data, work, args) for _ in range(args.repeats)]
    done = [r for r in rows if "error" not in r]
    if not done:
        return rows[-1]
    done.sort(key=lambda r: r["samples_per_s"])
    row = dict(done[len(done) // 2])
    row["samples_per_s_runs"] = [r["samples_per_s"] for r in rows if "error" not in r]
    for key in ("driver_peak_mib", "object_store_peak_mib"):
        values = [r[key] for r in done if r.get(key) is not None]
        row[key] = max(values) if values else None
    peaks = zip(*(r["peer_peak_mib"] for r in done))
    row["peer_peak_mib"] = [max((v for v in vs if v is not None), default=None) for vs in peaks] or row["peer_peak_mib"]
    return row


def _train_run(kind: str, label: str, loader: str, data: dict[str, Any], work: Path, args) -> dict[str, Any]:
    job = write_yaml(work / "jobs" / f"train-{slug(label)}-{loader}.yaml", train_job(kind, data, args))
    run_dir = work / "runs" / f"{slug(label)}-{loader}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "codistill.run", "--config", str(job), "--output", str(run_dir)]
    res = run_monitored(cmd, work / "logs" / f"train-{slug(label)}-{loader}.log", args.poll_s, args.timeout_s)
    row: dict[str, Any] = {
        "data": label,
        "kind": kind,
        "loader": loader,
        "command": show(cmd),
        "job": train_job(kind, data, args),
        **{k: v for k, v in res.items() if k != "log_tail"},
    }
    summary = run_dir / "summary.json"
    if res["rc"] != 0 or not summary.exists():
        row["error"] = res.get("log_tail", "no summary.json")
        print(f"    FAILED ({res['rc']}); log {res['log']}:\n{row['error'][-1500:]}", flush=True)
        return row
    s = json.loads(summary.read_text())
    peers = s["peers"]
    row.update(
        samples_per_s=sum(p["samples_per_s"] for p in peers),
        peer_samples_per_s=[p["samples_per_s"] for p in peers],
        peer_busy_s=[p["busy_s"] for p in peers],
        run_wall_time_s=s["wall_time_s"],
        test_loss=[p["test_loss"] for p in peers],
    )
    rss = " / ".join(f"{v:,.0f}" for v in row["peer_peak_mib"] if v) or "n/a"
    store = "n/a" if row["object_store_peak_mib"] is None else f"{row['object_store_peak_mib']:,.1f}"
    print(
        f"  train   {label:<12} {loader:<10} {row['samples_per_s']:9.1f} samples/s  peak RSS driver "
        f"{row['driver_peak_mib'] or 0:,.0f} MiB, peers {rss} MiB, object store {store} MiB  "
        f"(run {s['wall_time_s']:.1f} s, wall {res['wall_s']:.1f} s)",
        flush=True,
    )
    if not row["peer_peak_mib"]:
        print(f"    note: no {PEER_TITLE} process seen below the driver", flush=True)
    if row["object_store_note"]:
        print(f"    object store: n/a: {row['object_store_note']}", flush=True)
    return row


def skipped(kind: str, label: str, loader: str, why: str) -> dict[str, Any]:
    print(f"  train   {label:<12} {loader:<10} skipped: {why}", flush=True)
    return {"data": label, "kind": kind, "loader": loader, "skipped": why}


def size_label(mb: float) -> str:
    return f"text {mb:g} MB"


def slug(label: str) -> str:
    """A file name for a row label: 'text 10 MB' -> 'text-10mb'."""
    return "-".join(label.lower().split()).replace("-mb", "mb")


def auto_shard_mb(size_mb: float, shard_mb: float | None) -> float:
    return shard_mb if shard_mb is not None else float(min(64.0, max(0.25, size_mb / 8)))


def text_parts(args, work: Path, out: dict[str, Any]) -> None:
    lines, source = base_lines(Path(args.corpus) if args.corpus else DEFAULT_CORPUS)
    out["corpus"] = {"source": source, "base_lines": len(lines), "sizes": []}
    print(f"corpus: {source} ({len(lines):,} lines), repeated with variation", flush=True)
    for mb in args.sizes_mb:
        label = size_label(mb)
        path = work / "corpus" / f"corpus-{mb:g}mb.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        info = make_corpus(lines, int(mb * 1_000_000), path)
        out["corpus"]["sizes"].append({"size_mb": mb, **info})
        print(
            f"  corpus  {label:<12} {info['bytes']:,} bytes, {info['repetitions']} repetitions ({info['gen_s']:.1f} s)"
        )
        job = write_yaml(
            work / "jobs" / f"prepare-{mb:g}mb.yaml", {"name": "bench-data-scale", "data": text_data(str(path))}
        )
        shard_mb = auto_shard_mb(mb, args.shard_mb)
        if "prepare" in args.parts:
            rows, kept = prepare_all(job, label, "tokens", shard_mb, work, args)
        else:  # training needs a prepared folder: one Ray prepare, recorded but not part of the prepare table
            cpus = max(args.prepare_cpus)
            dest = work / "prepared" / f"{slug(label)}-ray{cpus}"
            rows = [
                {**prepare_once(job, dest, cpus, shard_mb, "tokens", work, args), "data": label, "for_training": True}
            ]
            kept = None if "error" in rows[0] else dest
        for r in rows:
            r["size_mb"] = mb
        out["prepare"] += rows
        if "train" in args.parts:
            if mb <= args.in_memory_max_mb:
                row = train_once("text", label, "in-memory", text_data(str(path)), work, args)
            else:
                row = skipped(
                    "text", label, "in-memory", f"does not fit (> --in-memory-max-mb {args.in_memory_max_mb:g})"
                )
            out["train"].append({**row, "size_mb": mb})
            if kept is not None:
                row = train_once("text", label, "prepared", text_data(str(kept)), work, args)
            else:
                row = skipped("text", label, "prepared", "the prepare failed")
            out["train"].append({**row, "size_mb": mb})
        if kept is not None:
            shutil.rmtree(kept, ignore_errors=True)
        if not args.keep:
            path.unlink()


def image_part(args, work: Path, out: dict[str, Any]) -> None:
    src = Path(args.cifar)
    if not (src / "train.parquet").is_file() or not (src / "test.parquet").is_file():
        print(f"images: skipped: no train.parquet and test.parquet in {src}", flush=True)
        out["images_skipped"] = f"no train.parquet and test.parquet in {src}"
        return
    if args.cifar_rows:
        src = cifar_subset(src, work / "cifar", (args.cifar_rows[0], args.cifar_rows[1]))
        print(f"images: the first {args.cifar_rows[0]:,} / {args.cifar_rows[1]:,} rows of {args.cifar} in {src}")
    train, test = str(src / "train.parquet"), str(src / "test.parquet")
    label = "cifar10"
    job = write_yaml(
        work / "jobs" / "prepare-cifar10.yaml", {"name": "bench-data-scale", "data": image_data(train, test)}
    )
    mb = (Path(train).stat().st_size + Path(test).stat().st_size) / 1e6
    shard_mb = auto_shard_mb(mb * 8, args.shard_mb)  # decoded images are ~8x the JPEG bytes: 8 chunks or more
    rows, kept = prepare_all(job, label, "images", shard_mb, work, args)
    out["images"]["prepare"] = rows
    out["images"]["model"] = args.image_model
    out["images"]["train"].append(train_once("images", label, "in-memory", image_data(train, test), work, args))
    if kept is not None:
        out["images"]["train"].append(train_once("images", label, "prepared", image_data(str(kept), None), work, args))
        shutil.rmtree(kept, ignore_errors=True)
    else:
        out["images"]["train"].append(skipped("images", label, "prepared", "the prepare failed"))


# --- results --------------------------------------------------------------------------------------------


def targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    res = []
    good = lambda r: "error" not in r and "skipped" not in r
    prepared = [r for r in out["train"] if r["loader"] == "prepared" and good(r) and r["peer_peak_mib"]]
    if len(prepared) >= 2:
        lo, hi = min(prepared, key=lambda r: r["size_mb"]), max(prepared, key=lambda r: r["size_mb"])
        a, b = max(lo["peer_peak_mib"]), max(hi["peer_peak_mib"])
        growth = b / a - 1
        res.append(
            {
                "target": f"text prepared: peak RSS per peer, {lo['size_mb']:g} -> {hi['size_mb']:g} MB, grows <= 20%",
                "value": f"{a:,.0f} -> {b:,.0f} MiB ({growth:+.1%})",
                "ratio": growth,
                "pass": growth <= 0.20,
            }
        )

    def speed(rows: list[dict], what: str) -> None:
        mem = next((r for r in rows if r["loader"] == "in-memory" and good(r)), None)
        prep = next((r for r in rows if r["loader"] == "prepared" and good(r)), None)
        if mem and prep:
            ratio = prep["samples_per_s"] / mem["samples_per_s"]
            res.append(
                {
                    "target": f"{what}: prepared samples/s >= 0.95 x in-memory",
                    "value": f"{prep['samples_per_s']:,.1f} vs {mem['samples_per_s']:,.1f} ({ratio:.3f}x)",
                    "ratio": ratio,
                    "pass": ratio >= 0.95,
                }
            )

    if out["train"]:
        smallest = min(r["size_mb"] for r in out["train"])
        speed([r for r in out["train"] if r["size_mb"] == smallest], size_label(smallest))
    speed(out["images"]["train"], "cifar10")
    return res


def table(out: dict[str, Any]) -> str:
    from codistill.table import text_table

    def f(v: float | None, fmt: str = ",.0f") -> str:
        return "-" if v is None else format(v, fmt)

    prep: dict[tuple[str, str], dict] = {}
    for r in out["prepare"] + out["images"]["prepare"]:
        prep[(r["data"], "local" if r["runner"] == "local" else f"ray{r['cpus']}")] = r
    cpus = out["settings"]["prepare_cpus"]
    header = [
        "data",
        "loader",
        "prepare s",
        "el/s local",
        *(f"el/s @{c} CPU" for c in cpus),
        "driver MiB",
        "peer0 MiB",
        "peer1 MiB",
        "store MiB start/peak",
        "samples/s",
        "note",
    ]
    body = []
    rows = out["train"] + out["images"]["train"]
    labels = list(
        dict.fromkeys([r["data"] for r in out["prepare"] + out["images"]["prepare"]] + [r["data"] for r in rows])
    )
    for label in labels:
        unit = "images_per_s" if label == "cifar10" else "tokens_per_s"
        runs = [r for r in rows if r["data"] == label] or [{"data": label, "loader": "prepared", "prepare_only": True}]
        for r in runs:
            cells = [label, r["loader"]]
            if r["loader"] == "prepared":
                top = prep.get((label, f"ray{max(cpus)}"))
                cells += [
                    f(top.get("prepare_s") if top else None, ".2f"),
                    *(f(prep.get((label, k), {}).get(unit)) for k in ["local", *(f"ray{c}" for c in cpus)]),
                ]
            else:
                cells += ["-"] * (2 + len(cpus))
            if "skipped" in r or "error" in r or "prepare_only" in r:
                note = "skipped: " + r["skipped"] if "skipped" in r else ("FAILED" if "error" in r else "not trained")
                body.append([*cells, "-", "-", "-", "-", "-", note])
                continue
            peers = [*r["peer_peak_mib"], None, None][:2]
            cells += [f(r["driver_peak_mib"]), f(peers[0]), f(peers[1])]
            store = f"{f(r['object_store_at_peer_start_mib'], ',.1f')} / {f(r['object_store_peak_mib'], ',.1f')}"
            cells += [store, f(r["samples_per_s"], ",.1f"), ""]
            body.append(cells)
    return text_table(header, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--parts", nargs="+", choices=["prepare", "train", "images"], default=["prepare", "train", "images"]
    )
    ap.add_argument(
        "--sizes-mb", nargs="+", type=float, default=None, help="text corpora, MB (10^6 bytes); 10 100 1000"
    )
    ap.add_argument("--corpus", default=None, help=f"base text (default {DEFAULT_CORPUS}; numpy words if missing)")
    ap.add_argument("--cifar", default=str(DEFAULT_CIFAR), help="folder with train.parquet and test.parquet")
    ap.add_argument("--cifar-rows", nargs=2, type=int, default=None, metavar=("TRAIN", "TEST"))
    ap.add_argument("--image-model", default="cnn")
    ap.add_argument("--image-limit-test", type=int, default=1000)
    ap.add_argument("--text-limit-test", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 200; --quick 30)")
    ap.add_argument("--in-memory-max-mb", type=float, default=100)
    ap.add_argument("--repeats", type=int, default=None, help="runs per training row, the median kept (3; --quick 1)")
    ap.add_argument("--prepare-cpus", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--shard-mb", type=float, default=None, help="prepare --shard-mb (default: size/8 in [0.25, 64])")
    ap.add_argument("--poll-s", type=float, default=0.2)
    ap.add_argument("--timeout-s", type=float, default=3600, help="per subprocess")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (corpora, jobs, logs, runs)")
    ap.add_argument("--quick", action="store_true", help="1 and 3 MB, 30 steps, 2,000/500 CIFAR rows")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_scale.json"))
    args = ap.parse_args()
    if args.quick:  # what is given explicitly stays
        args.cifar_rows = args.cifar_rows or [2000, 500]
        args.image_limit_test = min(args.image_limit_test, 500)
    args.sizes_mb = args.sizes_mb or ([1, 3] if args.quick else [10, 100, 1000])
    args.steps = args.steps or (30 if args.quick else 200)
    args.repeats = args.repeats or (1 if args.quick else 3)

    os.environ.setdefault("RAY_AUTH_MODE", "token")  # reads the object store of the token-protected local clusters
    import numpy
    import ray
    import torch

    created = args.work is None
    work = Path(tempfile.mkdtemp(prefix="codistill-data-scale-", dir="/tmp") if created else args.work).resolve()
    for sub in ("logs", "jobs", "prepared", "runs", "corpus"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "machine": {
            "cpus": CORES,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "numpy": numpy.__version__,
        },
        "command": "python bench/data_scale.py " + " ".join(sys.argv[1:]),
        "prepare_wrapper": PREPARE_WRAPPER,  # $PREPARE_WRAPPER in the prepare commands
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "work": str(work),
        "corpus": None,
        "prepare": [],
        "train": [],
        "images": {"prepare": [], "train": []},
    }
    print(f"data_scale: parts {' '.join(args.parts)}; scratch {work}", flush=True)
    t0 = time.perf_counter()
    try:
        if "prepare" in args.parts or "train" in args.parts:
            text_parts(args, work, out)
        if "images" in args.parts:
            image_part(args, work, out)
    finally:
        if not args.keep:
            for sub in ("logs", "jobs", "prepared", "runs", "corpus", "cifar"):
                shutil.rmtree(work / sub, ignore_errors=True)
            if created:
                shutil.rmtree(work, ignore_errors=True)
    out["targets"] = targets(out)
    out["total_s"] = time.perf_counter() - t0
    print()
    print("el/s: tokens/s for text, images/s for cifar10; prepare s: Ray Data at the most CPUs; RSS: peak (VmHWM)")
    print(table(out))
    for t in out["targets"]:
        print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']}")
    failed = [
        r for r in out["prepare"] + out["train"] + out["images"]["prepare"] + out["images"]["train"] if "error" in r
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.out}" + (f"; {len(failed)} command(s) failed (see 'error' in the JSON)" if failed else ""))
    if failed:
        sys.exit(1)


ENV = child_env()

if __name__ == "__main__":
    main()

"""The programs `harness bench apps` runs, and how each run is checked.

Every workload is a real program started unmodified on the pnode; the only
code of ours is the input generator, the pure-Python and numpy scripts, and
the redis data check. Each run yields an Outcome: its time and a fingerprint
(exit status plus checksums of what it produced) that every run on remote
memory must reproduce exactly.

  redis    Debian's redis-server; its own redis-benchmark is the client (SET
           and GET, random keys). The time is redis-benchmark's own: requests
           over its measured req/s, summed over the tests, so neither the
           server's start-up nor the client's is in it. Check: before the load,
           a Lua script in the server writes redis_check_keys known values;
           after it, another reads them all back and returns the SHA-1 of the
           concatenation, which must equal the local run's.
  xz       `xz -6 -T1` compressing a generated text (Zipf-distributed words
           from a made-up vocabulary: ~3.5x compressible); single-threaded xz
           is deterministic, so the output's sha256 must equal the local
           one's, and it must decompress (`xz -dc`, local memory) to the
           input's sha256.
  python   a dict of N entries, each a key string and a tuple of an int, a hex
           string and a one-element list (about 5 objects), walked in a
           pseudo-random order that updates it, then in order; prints
           checksums, which must equal the local run's.
  numpy*   D = (A @ B) @ A over n x n float64 matrices of small integers
           (exact, so any BLAS blocking or thread count gives the same bits);
           prints sums and the CRC-32 of D, which must equal the local run's.

Sizes: HOST for process placement; GUEST, scaled down, for TCG guests.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.errors import HarnessError
from harness.text import tail

# A command run on the pnode with local memory (input generation, checks).
Shell = Callable[[list[str]], Any]


@dataclass(frozen=True)
class Scale:
    label: str
    redis_requests: int  # per test (SET, GET)
    redis_keyspace: int
    redis_value: int  # bytes
    redis_check_keys: int
    xz_bytes: int
    python_entries: int
    numpy_n: int
    timeout: float  # seconds per run


HOST = Scale("host", 400_000, 100_000, 512, 20_000, 64 << 20, 1_000_000, 4096, 1800.0)
# TCG guests do arithmetic ~100-200x slower: every input is scaled down.
GUEST = Scale("vm (TCG guest, inputs scaled down)", 20_000, 10_000, 512, 2_000, 8 << 20,
              100_000, 512, 3600.0)


@dataclass
class Outcome:
    seconds: float | None  # None: the run produced nothing to time
    fingerprint: str
    rps: float | None = None


GEN = r"""
import hashlib, itertools, os, random, sys
path, size = sys.argv[1], int(sys.argv[2])
os.makedirs(os.path.dirname(path), exist_ok=True)
rng = random.Random(14)
letters = "etaoinshrdlcumwfgypbvkjxqz"
freq = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2,
        2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
vocab = ["".join(rng.choices(letters, freq, k=rng.randint(1, 12))) for _ in range(50000)]
cum = list(itertools.accumulate(1 / (r + 1) for r in range(len(vocab))))
h, n = hashlib.sha256(), 0
with open(path, "wb") as f:
    while n < size:
        words = rng.choices(vocab, cum_weights=cum, k=1 << 16)
        lines, i = [], 0
        while i < len(words):
            k = rng.randint(4, 16)
            lines.append(" ".join(words[i:i + k]).capitalize() + ".\n")
            i += k
        chunk = "".join(lines).encode()[:size - n]
        f.write(chunk)
        h.update(chunk)
        n += len(chunk)
print(h.hexdigest())
"""

PYHEAP = r"""
import sys, zlib
n = int(sys.argv[1])
d = {}
for i in range(n):
    d["k%d" % i] = (i, "v%x" % (i * 2654435761 % 4294967296), [i & 255])
acc, j = 0, 1
for _ in range(n):
    j = (j * 1103515245 + 12345) % n
    v = d["k%d" % j]
    acc = (acc * 31 + v[0] + len(v[1]) + v[2][0]) % 1000000007
    v[2][0] += 1
crc = 0
for k, v in d.items():
    crc = zlib.crc32(v[1].encode(), zlib.crc32(k.encode(), crc)) ^ v[2][0]
print(n, acc, crc)
"""

MATMUL = r"""
import sys, zlib
import numpy as np
n = int(sys.argv[1])
a = np.arange(n * n, dtype=np.float64).reshape(n, n) % 7
b = a.T % 5
c = a @ b
d = c @ a
print(n, int(c.sum()), float(d[0, 0]), float(d[-1, -1]), zlib.crc32(d.tobytes()))
"""

# The client (not interposed): waits for the server, writes the check keys,
# runs redis-benchmark, reads the check keys back.
# sh -c REDIS_CLIENT sh TARGET FILL_LUA SUM_LUA KEYS BENCHMARK-ARGS...
REDIS_CLIENT = r"""
target=$1 fill=$2 sum=$3 keys=$4; shift 4
i=0
until [ "$(redis-cli $target ping 2>/dev/null)" = PONG ]; do
    i=$((i + 1)); [ $i -gt 3000 ] && { echo "redis-server never answered" >&2; exit 3; }
    sleep 0.1
done
[ "$(redis-cli $target eval "$fill" 0 "$keys")" = 1 ] || { echo "check fill failed" >&2; exit 4; }
redis-benchmark $target "$@" || exit 5
echo "check $(redis-cli $target eval "$sum" 0 "$keys")"
"""
FILL_LUA = ("for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'chk:' .. i, "
            "string.rep(string.char(97 + i % 26), 100 + i % 400) .. i) end return 1")
SUM_LUA = ("local t = {} for i = 1, tonumber(ARGV[1]) do t[i] = redis.call('GET', 'chk:' .. i) "
           "end return redis.sha1hex(table.concat(t, ','))")
# Sets IFF_UP on lo (SIOCGIFFLAGS / SIOCSIFFLAGS), if it is not up already.
LO_UP = r"""
import fcntl, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
if not flags & 1:
    fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
"""
_RPS = re.compile(rb"^\s*([A-Z][^:\n]*?): ([0-9.]+) requests per second", re.M)


def parse_rps(out: bytes) -> dict[str, float]:
    """redis-benchmark -q's summary lines, {"SET": req/s, "GET": req/s}; its
    progress lines (rps=..., rewritten in place with CR) are skipped."""
    text = out.replace(b"\r", b"\n")
    return {m[1].decode(): float(m[2]) for m in _RPS.finditer(text)}


class Workload:
    name = ""
    env: dict[str, str] | None = None
    client: list[str] | None = None

    def __init__(self, scale: Scale, workdir: str) -> None:
        self.scale, self.workdir = scale, workdir

    def prepare(self, sh: Shell) -> None:
        """Once, before the first run: inputs, made on the pnode itself."""

    def argv(self, tag: str) -> list[str]:
        raise NotImplementedError

    def outcome(self, res: Any, sh: Shell, tag: str) -> Outcome:
        out = res.stdout.decode(errors="replace").strip()
        return Outcome(res.seconds, f"exit {res.returncode}; {out}")

    def describe(self) -> str:
        raise NotImplementedError


class Redis(Workload):
    name = "redis"

    def __init__(self, scale: Scale, workdir: str, port: int, guest: bool = False) -> None:
        super().__init__(scale, workdir)
        s, self.port, self.guest = scale, port, guest
        target = f"-h 127.0.0.1 -p {port}"
        self.client = ["sh", "-c", REDIS_CLIENT, "sh", target,
                       FILL_LUA, SUM_LUA, str(s.redis_check_keys), "-t", "set,get",
                       "-n", str(s.redis_requests), "-d", str(s.redis_value),
                       "-r", str(s.redis_keyspace), "-q"]

    def prepare(self, sh: Shell) -> None:
        if not self.guest:
            return
        # Nothing in the pnode guest brings its loopback up; redis listens on it.
        r = sh([sys.executable, "-c", LO_UP])
        if r.returncode:
            raise HarnessError(f"apps: cannot bring up the pnode guest's loopback for redis: "
                               f"{tail(r.stderr)}")

    def argv(self, tag: str) -> list[str]:
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.workdir, "--daemonize", "no"]

    def outcome(self, res: Any, sh: Shell, tag: str) -> Outcome:
        rps = parse_rps(res.client_stdout)
        check = re.search(rb"^check (\S+)$", res.client_stdout, re.M)
        fp = (f"server exit {res.returncode}; client exit {res.client_returncode}; "
              f"tests {','.join(sorted(rps))}; data {check[1].decode() if check else None}")
        if sorted(rps) != ["GET", "SET"] or not all(rps.values()):
            return Outcome(None, fp + f"; client said: {tail(res.client_stdout, 300)} "
                           f"{tail(getattr(res, 'client_stderr', b''), 300)}")
        n = self.scale.redis_requests
        secs = sum(n / r for r in rps.values())
        return Outcome(secs, fp, rps=2 * n / secs)

    def describe(self) -> str:
        s = self.scale
        return (f"redis: redis-server, redis-benchmark -t set,get -n {s.redis_requests} "
                f"-d {s.redis_value} -r {s.redis_keyspace}, {s.redis_check_keys} check keys")


class Xz(Workload):
    name = "xz"

    def __init__(self, scale: Scale, workdir: str) -> None:
        super().__init__(scale, workdir)
        self.input = f"{workdir}/words.txt"
        self.input_sha = ""

    def prepare(self, sh: Shell) -> None:
        r = sh([sys.executable, "-c", GEN, self.input, str(self.scale.xz_bytes)])
        if r.returncode or not re.fullmatch(rb"[0-9a-f]{64}\s*", r.stdout):
            raise HarnessError(f"apps: generating xz's input failed (status {r.returncode}): "
                               f"{tail(r.stderr)}")
        self.input_sha = r.stdout.decode().strip()

    def argv(self, tag: str) -> list[str]:
        return ["xz", "-6", "-T1", "-k", "-f", "-S", f".{tag}.xz", self.input]

    def outcome(self, res: Any, sh: Shell, tag: str) -> Outcome:
        out = f"{self.input}.{tag}.xz"
        r = sh(["sh", "-c", 'sha256sum < "$1"; xz -dc "$1" | sha256sum; rm -f "$1"', "sh", out])
        sums = [line.split()[0] for line in r.stdout.decode(errors="replace").splitlines()
                if line.strip()]
        fp = f"exit {res.returncode}; xz {sums[0] if sums else None}"
        if len(sums) != 2 or sums[1] != self.input_sha:
            return Outcome(None, fp + f"; does not decompress to the input ({tail(r.stderr)})")
        return Outcome(res.seconds, fp)

    def describe(self) -> str:
        return (f"xz: xz -6 -T1 of {self.scale.xz_bytes >> 20} MiB of generated text "
                f"(input sha256 {self.input_sha[:12]}...)")


class PyHeap(Workload):
    name = "python"

    def argv(self, tag: str) -> list[str]:
        return [sys.executable, "-c", PYHEAP, str(self.scale.python_entries)]

    def describe(self) -> str:
        return (f"python: dict of {self.scale.python_entries:,} entries (5 objects each), "
                f"random then sequential walk")


class Numpy(Workload):
    def __init__(self, scale: Scale, workdir: str, threads: int) -> None:
        super().__init__(scale, workdir)
        self.name = f"numpy{threads}t"
        t = str(threads)
        self.env = {"OPENBLAS_NUM_THREADS": t, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t}

    def argv(self, tag: str) -> list[str]:
        return [sys.executable, "-c", MATMUL, str(self.scale.numpy_n)]

    def describe(self) -> str:
        n = self.scale.numpy_n
        return f"{self.name}: (A @ B) @ A, {n}x{n} float64, BLAS on {self.env['OMP_NUM_THREADS']}"


NAMES = ("redis", "xz", "python", "numpy1t", "numpy2t")


def workloads(scale: Scale, workdir: str, port: int, guest: bool = False,
              names: tuple[str, ...] | list[str] | None = None) -> list[Workload]:
    names = list(names or NAMES)
    bad = [n for n in names if n not in NAMES]
    if bad:
        raise HarnessError(f"apps: unknown app(s) {', '.join(bad)}; choose from {', '.join(NAMES)}")
    make = {"redis": lambda: Redis(scale, workdir, port, guest), "xz": lambda: Xz(scale, workdir),
            "python": lambda: PyHeap(scale, workdir),
            "numpy1t": lambda: Numpy(scale, workdir, 1),
            "numpy2t": lambda: Numpy(scale, workdir, 2)}
    return [make[n]() for n in NAMES if n in names]

"""`scripts/bench --side snapshot`: uploading a seed volume as an EBS
snapshot, coral-builder's ebs-direct against coldsnap (awslabs' EBS direct
API uploader, the tool a user would otherwise pick), both against moto's
server on 127.0.0.1 through coral's recording proxy (tests/src/ebsproxy.rs,
as the program coral-ebs-proxy).

Setup, once per image set and untimed:
  v1  `coral-builder build` of the set without its last image (corpus: all
      but tiny), or of its one image (large)
  v2  `coral-builder build --parent-image v1` of the whole set: v1 with one
      image added, built on v1 (what a changed seed set looks like); a set
      of one image has no v2, and only the v1 uploads run

Every run starts a fresh moto_server and proxy, then (each from a cold page
cache) times:
  coral v1          `coral-builder snapshot v1 --snapshot ebs-direct`
  coldsnap v1       `coldsnap upload --omit-zero-blocks --wait v1`
  coldsnap v1 (default)  `coldsnap upload --wait v1`: coldsnap's default,
                    every block of the image sent, zeros included
  coral v2 (incr.)  `coral-builder snapshot v2 --snapshot ebs-direct
                    --parent-image v1` (parent: coral's v1 snapshot of this run)
  coldsnap v2       `coldsnap upload --omit-zero-blocks --wait v2` (coldsnap
                    has no incremental mode: the whole image again)
and reports the median wall time, the ratio to coldsnap's, the blocks and
bytes the proxy received, and peak RSS (GNU time's %M).

moto's server answers StartSnapshot with a block size of 512 bytes; the
proxy rewrites it to EBS's 524288, so coldsnap (which trusts the answer)
sends 512 KiB blocks as it would to EBS. moto is far slower than EBS (one
Python process storing every block in memory), so absolute times are
moto's; the ratios and the blocks sent are what carry over.

coldsnap is installed once with `cargo install --locked coldsnap
--version 0.12.0` into $CORAL_CACHE/tools (compiles the AWS SDK: minutes).
"""

import json
import os
import statistics
import subprocess
import tempfile
import time

COLDSNAP_VERSION = "0.12.0"
WAYS = ["coral-v1", "coldsnap-v1", "coldsnap-v1-default", "coral-v2-incremental", "coldsnap-v2"]


def ensure_coldsnap(b):
    root = os.path.join(b.CACHE, f"tools/coldsnap-{COLDSNAP_VERSION}")
    exe = os.path.join(root, "bin/coldsnap")
    if not os.path.exists(exe):
        b.log(f"cargo install coldsnap {COLDSNAP_VERSION} from crates.io (once; compiles the AWS SDK)")
        env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(b.CACHE, "target-coldsnap"))
        b.run(["cargo", "install", "--locked", "--version", COLDSNAP_VERSION, "--root", root,
               "coldsnap"], env=env)
    return exe


def aws_env(endpoint):
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="coral-bench",
               AWS_SECRET_ACCESS_KEY="coral-bench-secret", AWS_REGION="us-east-1",
               AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", CORAL_LOG="warn")
    env.pop("AWS_PROFILE", None)
    return env


class Endpoint:
    """moto_server and the recording proxy in front of it, both on 127.0.0.1."""

    def __init__(self, b, proxy_bin, work):
        moto = os.path.join(b.CACHE, "venv/bin/moto_server")
        if not os.path.exists(moto):
            b.die(f"{moto} is missing: run scripts/setup (it installs moto into a venv)")
        self.port = b.free_port()
        env = dict(os.environ, MOTO_EC2_LOAD_DEFAULT_AMIS="false", AWS_DEFAULT_REGION="us-east-1")
        self.moto = b.Service("moto_server", [moto, "-H", "127.0.0.1", "-p", str(self.port)],
                              os.path.join(work, "moto.log"), env=env)
        b.wait_until("moto_server", lambda: b.port_open(self.port), 60, self.moto)
        self.proxy = subprocess.Popen([proxy_bin, f"127.0.0.1:{self.port}"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.url = self.proxy.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            b.die(f"coral-ebs-proxy said {self.url!r}")

    def finish(self):
        """Stops both; returns what the proxy recorded."""
        self.proxy.stdin.close()
        out = self.proxy.stdout.read()
        self.proxy.wait(30)
        self.moto.stop()
        return json.loads(out)


def timed_upload(b, way, cmd, env, work):
    rss_file = os.path.join(work, f"{way}.rss")
    out, err = os.path.join(work, f"{way}.out"), os.path.join(work, f"{way}.log")
    b.drop_caches()
    with open(out, "wb") as o, open(err, "wb") as e:
        t0 = time.monotonic()
        p = b.timed(cmd, rss_file, o, e, env=env)
        rc = p.wait()
        wall = time.monotonic() - t0
    if rc != 0:
        raise b.RunFailed(f"{way} exited {rc}:\n{b.tail(err)}")
    rss, cpu = b.read_time(rss_file)
    with open(out) as f:
        text = f.read()
    return {"wall": wall, "rss_kib": rss, "cpu_s": cpu, "stdout": text}


def snapshot_id(way, text, b):
    """The snapshot a way made: coral prints its record, coldsnap the ID."""
    if way.startswith("coral"):
        return json.loads(text)["id"]
    for word in text.split():
        if word.startswith("snap-"):
            return word
    raise b.RunFailed(f"{way} printed no snapshot ID: {text[-300:]!r}")


def one_run(b, proxy_bin, coldsnap, seeds, work):
    """All four uploads against one fresh endpoint; {way: result}."""
    ep = Endpoint(b, proxy_bin, work)
    env = aws_env(ep.url)
    results, ids = {}, {}
    try:
        for way in [w for w in WAYS if "v2" not in w or "v2" in seeds]:
            image = seeds["v2"] if "v2" in way else seeds["v1"]
            if way.startswith("coral"):
                cmd = [b.CORAL_BIN, "snapshot", image, "--snapshot", "ebs-direct",
                       "--snapshot-poll", "200ms"]
                if way == "coral-v2-incremental":
                    cmd += ["--parent-image", seeds["v1"]]
            elif way == "coldsnap-v1-default":
                cmd = [coldsnap, "upload", "--no-progress", "--wait", image]
            else:
                cmd = [coldsnap, "upload", "--no-progress", "--omit-zero-blocks", "--wait", image]
            r = timed_upload(b, way, cmd, env, work)
            ids[way] = snapshot_id(way, r.pop("stdout"), b)
            results[way] = r
    finally:
        recorded = ep.finish()
    if recorded.get("badChecksums"):
        raise b.RunFailed(f"block checksums that do not match their bytes: {recorded['badChecksums'][:3]}")
    for way, sid in ids.items():
        snap = recorded["snapshots"].get(sid, {"blocks": 0, "bytes": 0, "puts": 0})
        results[way].update(snapshot=sid, blocks=snap["blocks"], bytes=snap["bytes"],
                            puts=snap["puts"], aggregate_ok=snap.get("aggregateOk"))
    return results


def build_pair(b, refs, host, seed_dir):
    """v1 (all but the last image) and v2 (all, built on v1), untimed."""
    v1, v2 = os.path.join(seed_dir, "v1.img"), os.path.join(seed_dir, "v2.img")
    if len(refs) == 1:
        steps = [(v1, refs, [])]
    else:
        steps = [(v1, refs[:-1], []), (v2, refs, ["--parent-image", v1])]
    for out, images, extra in steps:
        cmd = b.coral_build_cmd(images, host, out) + extra
        errlog = out + ".log"
        with open(out + ".json", "wb") as o, open(errlog, "wb") as e:
            rc = subprocess.run(cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            raise b.RunFailed(f"coral-builder ({os.path.basename(out)}) exited {rc}:\n{b.tail(errlog)}")
    seed = {"v1": v1, "v1_size": os.stat(v1).st_size}
    if len(refs) > 1:
        with open(v2 + ".json") as f:
            built_on = json.load(f).get("builtOn") or {}
        seed.update(v2=v2, v2_size=os.stat(v2).st_size, added=refs[-1].rsplit("/", 1)[-1],
                    v2_written=built_on.get("bytesWritten", 0))
    return seed


def written(n):
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def label(way):
    return {
        "coral-v1": "coral-builder snapshot --snapshot ebs-direct (v1)",
        "coldsnap-v1": "coldsnap upload --omit-zero-blocks --wait (v1)",
        "coldsnap-v1-default": "coldsnap upload --wait (v1; its default: zero blocks sent too)",
        "coral-v2-incremental": "coral-builder snapshot --snapshot ebs-direct --parent-image v1 (v2)",
        "coldsnap-v2": "coldsnap upload --omit-zero-blocks --wait (v2, whole)",
    }[way]


def report(b, args, facts, sets, results, errors, seeds, h="####"):
    L = b.machine_lines(facts, [facts.get("coral-builder", "coral-builder not built"),
                                f"coldsnap {COLDSNAP_VERSION}", "moto_server (venv)"])
    L += [f"Method: `scripts/bench --side snapshot --set {args.set} --runs {args.runs}`: "
          "each run a fresh moto_server behind coral-ebs-proxy (block size rewritten to 512 KiB), "
          "page cache dropped before each upload, median of the runs.", ""]
    for s in sets:
        seed = seeds.get(s.name)
        L += [f"{h} {s.name}", ""]
        if not seed:
            L += [f"Not measured: {errors.get((s.name, 'setup'), 'no seed volumes')}", ""]
            continue
        if "v2" in seed:
            L += [f"v1: {s.name} without {seed['added']}, {b.gib(seed['v1_size'])} image; "
                  f"v2: all of {s.name}, built on v1 ({written(seed['v2_written'])} "
                  f"written), {b.gib(seed['v2_size'])} image.", ""]
        else:
            L += [f"v1: {s.name}, {b.gib(seed['v1_size'])} image (one image: no v2).", ""]
        L += [
              "| upload | wall (median) | vs coldsnap | blocks sent | MiB sent | peak RSS |",
              "|---|---|---|---|---|---|"]
        runs = results.get(s.name, {})
        base = {"coral-v1": "coldsnap-v1", "coral-v2-incremental": "coldsnap-v2"}
        for way in [w for w in WAYS if "v2" not in w or "v2" in seed]:
            rs = runs.get(way, [])
            if not rs:
                L.append(f"| {label(way)} | failed: {errors.get((s.name, way), '?')[:80]} | | | | |")
                continue
            wall = statistics.median(r["wall"] for r in rs)
            ratio = ""
            if way in base and runs.get(base[way]):
                other = statistics.median(r["wall"] for r in runs[base[way]])
                ratio = f"{other / wall:.2f}x faster" if wall > 0 else ""
            r = b.median_run(rs)
            L.append(f"| {label(way)} | {wall:.2f} s | {ratio} | {r['blocks']} | "
                     f"{r['bytes'] / 2**20:.1f} | {b.mib(r['rss_kib']):.0f} MiB |")
        L.append("")
    return "\n".join(L)


def main(b, args):
    b.ensure_tools([], False)
    proxy_bin = os.path.join(b.TARGET, "release/coral-ebs-proxy")
    packages = [("coral-builder", b.CORAL_BIN), ("coral-tests", proxy_bin)]
    if args.no_build:
        for _, path in packages:
            if not os.path.exists(path):
                b.die(f"--no-build but no {path}")
    else:
        b.build_binaries(packages)
    coldsnap = ensure_coldsnap(b)
    set_names = ["corpus", "large"] if args.set == "all" else [args.set]
    sets = [b.corpus_set() if n == "corpus" else b.large_set() for n in set_names]
    work_root = os.path.join(b.CACHE, "bench/work")
    os.makedirs(work_root, exist_ok=True)
    facts = b.machine_facts(work_root)
    results, errors, seeds = {}, {}, {}
    for s in sets:
        reg = b.Registry(s.storage, read_only=True)
        refs = [f"{reg.host}/{img}:latest" for img in s.images]
        seed_dir = tempfile.mkdtemp(prefix=f"{s.name}-snapseed-", dir=work_root)
        b._tempdirs.append(seed_dir)
        try:
            b.log(f"{s.name}: building v1 and v2 (v2 on v1) with coral-builder (not timed)")
            try:
                seeds[s.name] = build_pair(b, refs, reg.host, seed_dir)
            except b.RunFailed as e:
                if not args.keep_going:
                    b.die(f"{s.name}: {e}")
                errors[(s.name, "setup")] = str(e)
                continue
            got = results.setdefault(s.name, {})
            for rnd in range(args.runs):
                work = tempfile.mkdtemp(prefix=f"{s.name}-snap-", dir=work_root)
                b._tempdirs.append(work)
                b.log(f"{s.name}: snapshot uploads, run {rnd + 1} of {args.runs} (load avg {b.loadavg()})")
                try:
                    for way, r in one_run(b, proxy_bin, coldsnap, seeds[s.name], work).items():
                        got.setdefault(way, []).append(r)
                        b.log(f"{s.name}: {way}: {r['wall']:.2f} s, {r['blocks']} blocks, "
                              f"peak RSS {b.mib(r['rss_kib']):.0f} MiB")
                except b.RunFailed as e:
                    if not args.keep_going:
                        b.die(f"{s.name}: {e}")
                    errors[(s.name, "run")] = str(e)
                finally:
                    b.shutil.rmtree(work, ignore_errors=True)
        finally:
            reg.stop()
            b.shutil.rmtree(seed_dir, ignore_errors=True)
    return report(b, args, facts, sets, results, errors, seeds), bool(errors)

"""stackwarden side by side with the tools it replaces, on the same emulator.

Run by scripts/bench (which makes the venvs and the release build). For the
dev environment (same templates, same parameters) it measures, alternating
the tools run by run, the median of N runs of:

- steady state (nothing to change): `stackwarden plan`, `sceptre diff`,
  `sceptre status`, and the old scripts' way with the AWS CLI (per stack in
  order: describe-stacks, update-stack treating "No updates are to be
  performed" as success, wait);
- steady state in a busy region: the same, and `stackwarden reconcile
  --once --fast`, with 5,000 other stacks (another team's) in the region;
  each tool's environment and the foreign stacks are made once, then the
  tool's runs follow one another (re-making 5,000 stacks per run would take
  longer than the whole bench);
- apply from an empty account: `stackwarden reconcile --once`,
  `sceptre launch -y`, and the AWS CLI script (create-stack + wait
  stack-create-complete per stack in order, outputs read with
  describe-stacks, as the old deploy.sh did);

with wall time, API calls (counted from the emulator's request log) and peak
memory (GNU time's maximum resident set size, the largest process of the
tool's process tree). The Sceptre project and the AWS CLI scripts are
generated here from desired-state/dev.yaml, not kept by hand.

It prints a table and writes target/bench/report.json. It asserts nothing.
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "bench"
ENV = "dev"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Emulator:
    """The test emulator, with its request log in a file we can count."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = OUT / "emulator.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv/bin/python"), str(ROOT / "tests/emulator/moto_shim.py"),
             "--port", str(self.port)],
            stdout=self.log, stderr=self.log,
        )
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the emulator did not start")

    def reset(self):
        req = urllib.request.Request(self.url + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req).read()

    def requests(self):
        """API requests logged so far (the emulator's own API excluded)."""
        self.log.flush()
        n = 0
        with open(self.log_path) as f:
            for line in f:
                if re.search(r'"(GET|POST|PUT|DELETE|HEAD) ', line) and "/moto-api/" not in line:
                    n += 1
        return n

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def load_env():
    """dev.yaml, with its stacks in dependency order."""
    path = ROOT / "desired-state" / f"{ENV}.yaml"
    doc = yaml.safe_load(path.read_text())
    stacks = doc["stacks"]
    deps = {}
    for key, s in stacks.items():
        d = set(s.get("depends_on", []))
        for v in (s.get("parameters") or {}).values():
            if isinstance(v, dict) and "output" in v:
                d.add(v["output"].split(".")[0])
        deps[key] = d
    order, done = [], set()
    while len(order) < len(stacks):
        wave = sorted(k for k in stacks if k not in done and deps[k] <= done)
        order += wave
        done |= set(wave)
    return doc, order, deps


def stack_name(doc, key):
    return doc["stacks"][key].get("name") or f"{doc['stack_name_prefix']}-{key}"


def tags(doc, key):
    t = dict(doc.get("tags") or {})
    t.update(doc["stacks"][key].get("tags") or {})
    return t


def render(v):
    return str(v).lower() if isinstance(v, bool) else str(v)


def make_sceptre(doc, order, deps):
    """A Sceptre project equal to the desired state."""
    root = OUT / "sceptre"
    shutil.rmtree(root, ignore_errors=True)
    (root / "config" / ENV).mkdir(parents=True)
    shutil.copytree(ROOT / "templates", root / "templates")
    (root / "config" / "config.yaml").write_text(
        yaml.safe_dump({"project_code": "performance-mgmt", "region": doc["region"]})
    )
    for key in order:
        s = doc["stacks"][key]
        params = {}
        for k, v in (s.get("parameters") or {}).items():
            if isinstance(v, dict):
                up, out = v["output"].split(".")
                params[k] = f"!stack_output {ENV}/{up}.yaml::{out}"
            else:
                params[k] = render(v)
        cfg = {
            # Sceptre names stacks <project_code>-<env>-<key> itself; its
            # !stack_output resolver only finds stacks named that way.
            "template": {"path": Path(s["template"]).name},
            "parameters": params,
            "stack_tags": tags(doc, key),
        }
        explicit = sorted(s.get("depends_on", []))
        if explicit:
            cfg["dependencies"] = [f"{ENV}/{d}.yaml" for d in explicit]
        text = yaml.safe_dump(cfg, sort_keys=False)
        # The resolver tag must not be quoted.
        text = re.sub(r"'(!stack_output [^']+)'", r"\1", text)
        (root / "config" / ENV / f"{key}.yaml").write_text(text)
    return root


def make_awscli(doc, order):
    """The old deploy.sh, and its steady-state variant, for the AWS CLI."""
    root = OUT / "awscli"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    lines = ["#!/usr/bin/env bash", "set -euo pipefail", f'cd "{root}"']
    lines.append('output() { aws cloudformation describe-stacks --stack-name "$1" '
                 "--query \"Stacks[0].Outputs[?OutputKey=='$2'].OutputValue\" --output text; }")

    def params_file(key):
        s = doc["stacks"][key]
        out = [f"cat > {key}.params.json <<EOF", "["]
        items = list((s.get("parameters") or {}).items())
        for i, (k, v) in enumerate(items):
            if isinstance(v, dict):
                up, o = v["output"].split(".")
                value = f"$(output {stack_name(doc, up)} {o})"
            else:
                value = render(v)
            comma = "," if i + 1 < len(items) else ""
            out.append(f'  {{"ParameterKey": "{k}", "ParameterValue": "{value}"}}{comma}')
        out += ["]", "EOF"]
        return out

    def tag_args(key):
        return " ".join(f"Key={k},Value={v}" for k, v in tags(doc, key).items())

    create, update = list(lines), list(lines)
    for key in order:
        s = doc["stacks"][key]
        name = stack_name(doc, key)
        template = ROOT / "desired-state" / s["template"]
        create += params_file(key)
        create.append(
            f"aws cloudformation create-stack --stack-name {name} --template-body file://{template.resolve()} "
            f"--parameters file://{key}.params.json --capabilities CAPABILITY_NAMED_IAM "
            f"--tags {tag_args(key)} >/dev/null"
        )
        create.append(f"aws cloudformation wait stack-create-complete --stack-name {name}")
        update.append(f"aws cloudformation describe-stacks --stack-name {name} >/dev/null")
        update += params_file(key)
        update.append(
            f"if out=$(aws cloudformation update-stack --stack-name {name} --template-body file://{template.resolve()} "
            f"--parameters file://{key}.params.json --capabilities CAPABILITY_NAMED_IAM "
            f"--tags {tag_args(key)} 2>&1); then "
            f"aws cloudformation wait stack-update-complete --stack-name {name}; "
            f'elif ! grep -q "No updates are to be performed" <<<"$out"; then echo "$out" >&2; exit 1; fi'
        )
    for name, body in (("deploy.sh", create), ("check.sh", update)):
        p = root / name
        p.write_text("\n".join(body) + "\n")
        p.chmod(0o755)
    return root


def measure(emu, argv, env, cwd=ROOT):
    """Runs one command; returns (seconds, api calls, peak RSS MiB)."""
    before = emu.requests()
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS %M"] + argv,
        cwd=cwd, env=env, capture_output=True, text=True,
    )
    took = time.perf_counter() - start
    rss = re.search(r"MAXRSS (\d+)", proc.stderr)
    # Every tool must succeed, and stackwarden must find nothing to change
    # in steady state (exit 0): a failed run measures nothing.
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return took, emu.requests() - before, (int(rss.group(1)) / 1024 if rss else 0.0)


def deploy_plain(doc, order, env):
    """What deploy.sh leaves behind (plain CreateStack per stack, declared
    tags), made quickly with boto3: the setup of the AWS CLI's steady state."""
    import boto3

    cfn = boto3.client("cloudformation", endpoint_url=env["AWS_ENDPOINT_URL"],
                       region_name=doc["region"], aws_access_key_id="bench",
                       aws_secret_access_key="bench")
    outputs = {}
    for key in order:
        s = doc["stacks"][key]
        params = []
        for k, v in (s.get("parameters") or {}).items():
            if isinstance(v, dict):
                up, o = v["output"].split(".")
                v = outputs[up][o]
            params.append({"ParameterKey": k, "ParameterValue": render(v)})
        name = stack_name(doc, key)
        cfn.create_stack(
            StackName=name,
            TemplateBody=(ROOT / "desired-state" / s["template"]).resolve().read_text(),
            Parameters=params, Capabilities=["CAPABILITY_NAMED_IAM"],
            Tags=[{"Key": k, "Value": v} for k, v in tags(doc, key).items()],
        )
        live = cfn.describe_stacks(StackName=name)["Stacks"][0]
        outputs[key] = {o["OutputKey"]: o["OutputValue"] for o in live.get("Outputs", [])}


def foreign_stacks(doc, env, n):
    """`n` stacks of another team in the region, made with boto3."""
    import boto3

    cfn = boto3.client("cloudformation", endpoint_url=env["AWS_ENDPOINT_URL"],
                       region_name=doc["region"], aws_access_key_id="bench",
                       aws_secret_access_key="bench")
    body = json.dumps({"Resources": {"Handle": {"Type": "AWS::CloudFormation::WaitConditionHandle"}}})
    for i in range(n):
        cfn.create_stack(StackName=f"other-team-{i:05d}", TemplateBody=body,
                         Tags=[{"Key": "team", "Value": "other"}])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--foreign", type=int, default=5000,
                    help="other stacks in the region for the busy-region scenario")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    doc, order, deps = load_env()
    sceptre_dir = make_sceptre(doc, order, deps)
    awscli_dir = make_awscli(doc, order)
    emu = Emulator()
    env = dict(os.environ)
    env.update(
        AWS_ENDPOINT_URL=emu.url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION=doc["region"], AWS_DEFAULT_REGION=doc["region"], NO_COLOR="1",
    )
    env.pop("AWS_PROFILE", None)
    sw = str(ROOT / "target/release/stackwarden")
    bench_bin = ROOT / ".venv-bench/bin"
    env["PATH"] = f"{bench_bin}:{env['PATH']}"
    sceptre = [str(bench_bin / "sceptre"), "--dir", str(sceptre_dir)]

    def run(argv):
        return lambda: subprocess.run(argv, env=env, cwd=ROOT, check=True, capture_output=True)

    # Steady state: each tool finds the environment as its own apply left
    # it, so "nothing to change" is true for each.
    steady_setup = {
        "stackwarden plan": run([sw, "reconcile", "--once", "-e", ENV, "-q"]),
        "sceptre diff": run(sceptre + ["launch", "-y", ENV]),
        "sceptre status": run(sceptre + ["launch", "-y", ENV]),
        "aws cli (old check)": lambda: deploy_plain(doc, order, env),
    }
    steady_tools = {
        "stackwarden plan": [sw, "plan", "-e", ENV],
        "sceptre diff": sceptre + ["diff", ENV],
        "sceptre status": sceptre + ["status", ENV],
        "aws cli (old check)": ["bash", str(awscli_dir / "check.sh")],
    }
    fast = "stackwarden reconcile --once --fast"
    scenarios = {
        "steady state": {"setup": steady_setup, "tools": steady_tools},
        f"steady state, {args.foreign} foreign stacks in the region": {
            "foreign": args.foreign,
            "setup": {**steady_setup, fast: steady_setup["stackwarden plan"]},
            "tools": {
                **steady_tools,
                fast: [sw, "reconcile", "--once", "-e", ENV, "--fast", "-q"],
            },
        },
        "apply from empty": {
            "setup": {},
            "tools": {
                "stackwarden reconcile --once": [sw, "reconcile", "--once", "-e", ENV, "-q"],
                "sceptre launch -y": sceptre + ["launch", "-y", ENV],
                "aws cli (old deploy.sh)": ["bash", str(awscli_dir / "deploy.sh")],
            },
        },
    }
    results = {}
    for scenario, spec in scenarios.items():
        names = list(spec["tools"])
        samples = {n: [] for n in names}
        if spec.get("foreign"):
            for name in names:
                emu.reset()
                foreign_stacks(doc, env, spec["foreign"])
                spec["setup"][name]()
                for _ in range(args.runs):
                    samples[name].append(measure(emu, spec["tools"][name], env))
        for run in range(0 if spec.get("foreign") else args.runs):
            # Alternate the order run by run, so no tool always goes first.
            rotated = names[run % len(names):] + names[: run % len(names)]
            for name in rotated:
                emu.reset()
                if name in spec["setup"]:
                    spec["setup"][name]()
                samples[name].append(measure(emu, spec["tools"][name], env))
        results[scenario] = {
            n: {
                "seconds": statistics.median(s[0] for s in samples[n]),
                "api_calls": statistics.median(s[1] for s in samples[n]),
                "peak_rss_mib": statistics.median(s[2] for s in samples[n]),
                "runs": len(samples[n]),
            }
            for n in names
        }
    emu.stop()

    report = {"environment": ENV, "runs": args.runs, "machine": os.uname().nodename,
              "cpus": os.cpu_count(), "scenarios": results}
    (OUT / "report.json").write_text(json.dumps(report, indent=2))
    print(f"dev environment, emulator on 127.0.0.1, median of {args.runs} runs, tools alternated\n")
    for scenario, tools in results.items():
        ours = next(v for k, v in tools.items() if k.startswith("stackwarden"))
        print(f"{scenario}")
        print(f"  {'tool':<30} {'wall s':>8} {'API calls':>10} {'peak MiB':>9}   {'stackwarden/peer (time, calls, memory)'}")
        for name, v in tools.items():
            ratio = ""
            if not name.startswith("stackwarden"):
                ratio = "{:.2f}, {:.2f}, {:.2f}".format(
                    ours["seconds"] / v["seconds"] if v["seconds"] else 0,
                    ours["api_calls"] / v["api_calls"] if v["api_calls"] else 0,
                    ours["peak_rss_mib"] / v["peak_rss_mib"] if v["peak_rss_mib"] else 0,
                )
            print(f"  {name:<30} {v['seconds']:>8.2f} {v['api_calls']:>10.0f} {v['peak_rss_mib']:>9.1f}   {ratio}")
        print()
    print(f"written: {OUT / 'report.json'}")


if __name__ == "__main__":
    main()

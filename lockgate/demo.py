"""``make demo``: lockgate on the bundled example config with bundled example model servers.

Starts the example chat servers (v1, v2) and classifier servers (v1, v2) on the ports named in
``examples/lockgate.yaml``, then ``lockgate up`` (xDS, ext_proc, Envoy), prints commands to try and
runs until Ctrl-C, which stops everything it started.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from lockgate.config import load_config
from lockgate.supervisor import Supervisor

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "examples" / "lockgate.yaml"

SERVERS = {  # (model, version) → module and flags: each version is a real, different server
    ("chat", "v1"): ("lockgate.examples.chat_server", ["--refusal-rate", "0.02"]),
    ("chat", "v2"): ("lockgate.examples.chat_server", ["--refusal-rate", "0.02", "--tokens-mean", "45"]),
    ("ticket-classifier", "v1"): ("lockgate.examples.classifier_server", []),
    ("ticket-classifier", "v2"): ("lockgate.examples.classifier_server", []),
}


def start_model_servers(config, log_dir: Path) -> list[subprocess.Popen]:
    procs = []
    for (model_name, version), (module, flags) in SERVERS.items():
        endpoint = config.model(model_name).versions[version].endpoints[0]
        log = open(log_dir / f"{model_name}-{version}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", module, "--host", endpoint.host, "--port", str(endpoint.port),
                                 "--version", version, *flags], stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True)
        line = proc.stdout.readline().decode() if proc.stdout else ""
        if not line.startswith("ready"):
            raise RuntimeError(f"{module} {version} did not start: see {log.name}")
        procs.append(proc)
    return procs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lockgate.demo")
    ap.add_argument("-c", "--config", default=str(DEFAULT_CONFIG))
    args = ap.parse_args(argv)
    config = load_config(args.config)
    log_dir = config.state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = start_model_servers(config, log_dir)
    try:
        sup = Supervisor(config, str(Path(args.config).resolve()))
        listener = f"http://{config.listener}"
        cfg = f"-c {args.config}"
        print(f"""
lockgate demo: model servers up (chat v1/v2, ticket-classifier v1/v2). Try, in another terminal:

  curl -s {listener}/v1/chat/completions -H 'x-user-id: alice' \\
       -d '{{"model": "chat", "messages": [{{"role": "user", "content": "hi"}}]}}'
  .venv/bin/lockgate {cfg} set-weight chat v2 20      # 20% of users to chat v2, sticky per user
  for u in $(seq 1 20); do curl -s -o /dev/null -w '%{{http_code}} ' -D - {listener}/v1/chat/completions \\
       -H "x-user-id: user-$u" -d '{{"messages": []}}' | grep -i x-model-version; done
  .venv/bin/lockgate {cfg} weights                    # desired weight and what each Envoy ACKed
  .venv/bin/lockgate {cfg} rollback chat              # everyone back on v1, timed per Envoy
  curl -s {listener}/v1/classify -H 'x-user-id: bob' -d '{{"text": "my card was charged twice"}}'
""", flush=True)
        time.sleep(0.1)
        return sup.run()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())

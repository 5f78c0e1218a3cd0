#!/usr/bin/env python3
"""Build the Docker image and check that it serves, meters and keeps its books.

Run it from the repository root where a Docker engine is available (not collected by pytest;
CI machines have no engine):

    python tests/check_docker.py
    python tests/check_docker.py --python-image registry.internal/python:3.12-slim

It builds the image from the Dockerfile, starts the fake provider of the tests on this host,
and runs the container with a config whose ``openai`` provider is that fake (reached through
``host.docker.internal``). Then, through the published port, it checks: /health; that the
database was created on the /data volume, owned by the image's user, mode 0600; a key made
with ``cli.py keys create`` in the container; a plain and a streamed chat call metered to the
provider's token counts; that ``docker stop`` (SIGTERM) drains and a new container on the same
volume has the same books. Everything it made (container, volume, image tag) is removed after.
"""

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fake_upstream import FakeUpstream  # noqa: E402

IMAGE, CONTAINER, VOLUME = "llmgw:check", "llmgw-check", "llmgw-check-data"
ADMIN_TOKEN = "llmgw-admin-docker-check-0123456789abcdef"


def docker(*args, check=True):
    result = subprocess.run(["docker", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise SystemExit(f"docker {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout.strip()


def call(port, method, path, body=None, key=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    connection.request(method, path, json.dumps(body) if body is not None else None, headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def start_container(port, config_dir):
    docker("run", "-d", "--name", CONTAINER, "-p", f"127.0.0.1:{port}:8000",
           "--add-host", "host.docker.internal:host-gateway",
           "-e", f"LLMGW_ADMIN_TOKEN={ADMIN_TOKEN}", "-e", "OPENAI_API_KEY=sk-real-key-for-the-fake",
           "-v", f"{VOLUME}:/data", "-v", f"{config_dir}/config.yaml:/app/config.yaml:ro", IMAGE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if call(port, "GET", "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the container did not answer /health within 30 s:\n" + docker("logs", CONTAINER))


def check(condition, what):
    print(("ok    " if condition else "FAIL  ") + what)
    if not condition:
        raise SystemExit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python-image", help="base image (the Dockerfile's PYTHON_IMAGE)")
    parser.add_argument("--port", type=int, default=18765, help="host port to publish")
    args = parser.parse_args()
    build = ["build", "-t", IMAGE, "--network", "host"]
    if args.python_image:
        build += ["--build-arg", f"PYTHON_IMAGE={args.python_image}"]
    started = time.monotonic()
    docker(*build, ROOT)
    check(True, f"image built ({time.monotonic() - started:.0f} s)")
    upstream = FakeUpstream(host="0.0.0.0").start()
    config_dir = tempfile.mkdtemp()
    with open(os.path.join(config_dir, "config.yaml"), "w") as config:
        config.write("server: {host: 0.0.0.0, port: 8000}\n"
                     f"providers:\n  openai:\n    base_url: http://host.docker.internal:{upstream.port}\n")
    os.chmod(os.path.join(config_dir, "config.yaml"), 0o644)  # read by the image's user
    docker("rm", "-f", CONTAINER, check=False)
    docker("volume", "rm", VOLUME, check=False)
    try:
        start_container(args.port, config_dir)
        check(True, "the container answers /health")
        listing = docker("exec", CONTAINER, "stat", "-c", "%a %U", "/data/gateway.db")
        check(listing == "600 llmgw", f"database on the volume, mode and owner: {listing}")
        created = json.loads(docker("exec", CONTAINER, "python", "cli.py", "keys", "create", "docker check",
                                    "--output", "json"))
        key = created["key"]
        request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
        status, data = call(args.port, "POST", "/v1/chat/completions", request, key)
        check(status == 200 and json.loads(data)["usage"]["total_tokens"] > 0, f"chat call: {status}")
        status, data = call(args.port, "POST", "/v1/chat/completions",
                            dict(request, stream=True, stream_options={"include_usage": True}), key)
        check(status == 200 and data.rstrip().endswith(b"data: [DONE]"), f"streamed chat call: {status}")
        sent = sum(report["usage"]["prompt_tokens"] + report["usage"]["completion_tokens"]
                   for report in upstream.reported)
        check(upstream.requests[-1]["headers"].get("authorization") == "Bearer sk-real-key-for-the-fake",
              "the provider got the real key, not the virtual one")

        def books():
            return json.loads(docker("exec", CONTAINER, "python", "cli.py", "stats", "--output", "json"))
        before = books()
        metered = sum(row["request_tokens"] + row["response_tokens"] for row in before)
        check(metered == sent, f"stats hold the provider's {sent} tokens: {metered}")
        started = time.monotonic()
        docker("stop", CONTAINER)
        check(True, f"docker stop drained and exited in {time.monotonic() - started:.1f} s "
                    f"(exit code {docker('inspect', '-f', '{{.State.ExitCode}}', CONTAINER)})")
        docker("rm", CONTAINER)
        start_container(args.port, config_dir)
        check(books() == before, "a new container on the same volume has the same books")
    finally:
        docker("rm", "-f", CONTAINER, check=False)
        docker("volume", "rm", VOLUME, check=False)
        docker("rmi", IMAGE, check=False)
        upstream.stop()


if __name__ == "__main__":
    main()

"""forgeml serve: a real uvicorn on a free loopback port, in a subprocess (or, where a test must hold
the model still, in a thread of this process), answering over real HTTP."""

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import forgeml
import tiny
from forgeml.compression.load import load_variant
from forgeml.data.prepare import load_splits
from forgeml.rundir import RunDir
from forgeml.serving.backends import Served, open_model
from forgeml.serving.config import ServeConfig
from servers import InProcess, Subprocess, free_port

pytestmark = pytest.mark.slow

TABLE = tiny.recipe(
    tiny.TABLE,
    "serve-table",
    model={"hidden_sizes": [16]},
    train={"max_steps": 20},
    compress={"methods": ["onnx"], "latency_runs": 10, "throughput_batches": 1, "calibration_rows": 16},
    explain={"methods": []},
)
TEXT = tiny.recipe(
    tiny.TEXT, "serve-text", data={"max_rows": 120}, model={"freeze_layers": 6}, train={"max_steps": 2, "lr": 3e-4}
)
LM = tiny.recipe(tiny.LM, "serve-lm", model={"n_layer": 1, "block_size": 32}, train={"max_steps": 5})


@pytest.fixture(scope="module")
def table_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / "table"
    forgeml.run(TABLE, folder)
    return folder


@pytest.fixture(scope="module")
def table_server(table_run):
    server = Subprocess(table_run, "--max-wait-ms", "50", "--api-key", "s3cret")
    yield server
    server.stop()


def rows_of(run_dir: Path, n: int) -> list[dict]:
    family = load_variant(run_dir / "compress" / "baseline").family
    return load_splits(RunDir(run_dir)).test[family.features].head(n).to_dict("records")


AUTH = {"Authorization": "Bearer s3cret"}


def test_predictions_equal_the_models(table_run, table_server):
    rows = rows_of(table_run, 5)
    response = httpx.post(f"{table_server.url}/v1/predict", json={"inputs": rows}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    table = json.loads((table_run / "compress" / "variants.json").read_text())
    recommended = next(row["name"] for row in table if row["recommended"])
    assert body["model_version"].startswith(f"table/{recommended}@")
    variant = load_variant(table_run / "compress" / recommended)
    expected = variant.logits(variant.family.encode_inputs(rows)).softmax(-1)
    got = torch.tensor([[p["probabilities"][label] for label in variant.family.labels] for p in body["predictions"]])
    assert torch.allclose(got, expected, atol=1e-5)
    assert [p["label"] for p in body["predictions"]] == [variant.family.labels[i] for i in expected.argmax(-1)]


def test_concurrent_requests_are_batched_together(table_run, table_server):
    rows = rows_of(table_run, 16)
    with ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(
                lambda row: (
                    httpx.post(f"{table_server.url}/v1/predict", json={"inputs": [row]}, headers=AUTH).status_code
                ),
                rows,
            )
        )
    assert codes == [200] * 16
    metrics = httpx.get(f"{table_server.url}/metrics").text
    count = next(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("forgeml_batch_size_count")
    )
    total = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("forgeml_batch_size_sum"))
    assert total / count > 1  # fewer model calls than inputs
    assert 'forgeml_requests_total{route="/v1/predict",status="200"}' in metrics
    assert "forgeml_queue_depth" in metrics and "forgeml_request_seconds_bucket" in metrics


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"mean radius": 1.0}] * 65}, "inputs"),
        ({"rows": []}, "inputs"),
        ({"inputs": "mean radius"}, "inputs"),
    ],
)
def test_invalid_bodies_get_422_naming_the_field(table_server, body, field):
    response = httpx.post(f"{table_server.url}/v1/predict", json=body, headers=AUTH)
    assert response.status_code == 422
    assert any(field in map(str, error["loc"]) for error in response.json()["detail"])


def test_bad_rows_get_422_naming_the_feature(table_run, table_server):
    row = rows_of(table_run, 1)[0]
    name = next(iter(row))
    cases = [
        ({**row, "colour": 1.0}, "colour"),  # unknown
        ({k: v for k, v in row.items() if k != name}, name),  # missing
        ({**row, name: "big"}, name),  # wrong type
        ({**row, name: True}, name),
    ]
    for bad, field in cases:
        response = httpx.post(f"{table_server.url}/v1/predict", json={"inputs": [row, bad]}, headers=AUTH)
        assert response.status_code == 422, bad
        assert any(error["loc"][-1] == field and 1 in error["loc"] for error in response.json()["detail"]), (
            response.text
        )


def test_malformed_and_oversized_bodies_get_422(table_server):
    url = f"{table_server.url}/v1/predict"
    response = httpx.post(url, content=b'{"inputs": [', headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 422
    response = httpx.post(url, content=b"x" * 1_000_001, headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 422 and "body" in response.json()["detail"][0]["loc"]


def chunks(size: int, piece: int = 64 * 1024):
    """A JSON body of ``size`` bytes, sent chunked: a generator gives httpx no length to send."""
    body = json.dumps({"inputs": [], "pad": "x" * max(0, size - 27)}).encode()
    for start in range(0, len(body), piece):
        yield body[start : start + piece]


def test_a_chunked_body_is_held_to_the_same_limit(table_server):
    url = f"{table_server.url}/v1/predict"
    headers = {**AUTH, "content-type": "application/json"}
    with httpx.Client(timeout=60) as client:
        request = client.build_request("POST", url, content=chunks(5_000_000), headers=headers)
        assert request.headers["transfer-encoding"] == "chunked" and "content-length" not in request.headers
        response = client.send(request)
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == [
        {"loc": ["body"], "msg": "the body is over 1000000 bytes", "type": "size"}
    ]  # as a Content-Length over the limit gets
    # A chunked body within the limit reaches the route whole: its fields are checked there.
    response = httpx.post(url, content=chunks(1000), headers=headers, timeout=60)
    assert response.status_code == 422 and {e["loc"][-1] for e in response.json()["detail"]} == {"inputs", "pad"}


def test_requests_without_the_key_get_401(table_server):
    assert httpx.post(f"{table_server.url}/v1/predict", json={"inputs": []}).status_code == 401
    wrong = {"Authorization": "Bearer guess"}
    assert httpx.post(f"{table_server.url}/v1/predict", json={"inputs": []}, headers=wrong).status_code == 401
    assert httpx.get(f"{table_server.url}/healthz").status_code == 200  # probes need no key
    assert httpx.get(f"{table_server.url}/docs").status_code == 200


class Held(Served):
    """The real model, made to wait at a gate: what is queued behind it can be counted."""

    def __init__(self, served: Served) -> None:
        super().__init__(served.variant, served.version)
        self.entered, self.gate = threading.Event(), threading.Event()
        self.gate.set()  # open while the server warms up

    def predict(self, inputs):
        self.entered.set()
        self.gate.wait(timeout=60)
        return super().predict(inputs)


def queue_depth(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    return next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("forgeml_queue_depth "))


def test_a_full_queue_answers_503_at_once_and_a_slow_answer_504(table_run):
    held = Held(open_model(table_run, "trained", threads=1))
    server = InProcess(held, ServeConfig(max_batch=1, max_wait_ms=0, max_queue=2, timeout_s=30))
    row = rows_of(table_run, 1)
    try:
        held.gate.clear()
        held.entered.clear()
        with ThreadPoolExecutor(3) as pool:
            post = lambda: httpx.post(f"{server.url}/v1/predict", json={"inputs": row}, timeout=60)  # noqa: E731
            running = pool.submit(post)
            assert held.entered.wait(30)  # the first input is in the model
            queued = [pool.submit(post), pool.submit(post)]
            deadline = time.monotonic() + 30
            while queue_depth(server.url) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            refused = httpx.post(f"{server.url}/v1/predict", json={"inputs": row}, timeout=5)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            two = httpx.post(f"{server.url}/v1/predict", json={"inputs": row * 2}, timeout=5)
            assert two.status_code == 503
            held.gate.set()
            assert [f.result().status_code for f in [running, *queued]] == [200, 200, 200]
    finally:
        held.gate.set()
        server.stop()

    server = InProcess(held, ServeConfig(timeout_s=0.5))
    try:
        held.gate.clear()
        response = httpx.post(f"{server.url}/v1/predict", json={"inputs": row}, timeout=30)
        assert response.status_code == 504
    finally:
        held.gate.set()
        server.stop()


def test_texts_are_validated_and_classified(tmp_path):
    folder = tmp_path / "text"
    forgeml.train(TEXT, folder)
    served = open_model(folder, "recommended", threads=None)  # no compress stage: the trained model
    assert served.version.startswith("text/trained@")
    server = InProcess(served, ServeConfig(max_text_chars=100, max_items=4))
    try:
        url = f"{server.url}/v1/predict"
        texts = ["Return the path.", "Open a socket and send the queued messages, then wait for the reply."]
        response = httpx.post(url, json={"inputs": texts})
        assert response.status_code == 200
        expected = served.variant.family.predict_proba(texts)
        labels = served.variant.family.labels
        got = [[p["probabilities"][label] for label in labels] for p in response.json()["predictions"]]
        assert torch.allclose(torch.tensor(got), expected, atol=1e-5)
        for body in ({"inputs": ["x" * 101]}, {"inputs": [""]}, {"inputs": ["a"] * 5}, {"inputs": [3]}):
            assert httpx.post(url, json=body).status_code == 422, body
    finally:
        server.stop()


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(table_run):
    server = Subprocess(table_run, "--variant", "trained", "--max-wait-ms", "1500", "--max-batch", "64")
    rows = rows_of(table_run, 1)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, f"{server.url}/v1/predict", json={"inputs": rows}, timeout=30)
        time.sleep(0.5)  # it waits in the batcher for more inputs
        assert server.stop() == 0
        assert in_flight.result().status_code == 200
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def test_a_language_model_streams_its_tokens_in_order(tmp_path):
    folder = tmp_path / "lm"
    forgeml.train(LM, folder)
    served = open_model(folder, "trained", threads=None)
    server = InProcess(served, ServeConfig(max_new_tokens=32))
    try:
        url = f"{server.url}/v1/generate"
        body = {"prompt": "def ", "max_new_tokens": 12, "temperature": 0}
        whole = httpx.post(url, json=body, timeout=60)
        assert whole.status_code == 200
        events = []
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
        pieces, end = events[:-1], events[-1]
        assert [p["index"] for p in pieces] == list(range(len(pieces))) and end["tokens"] == len(pieces)
        text = "".join(p["text"] for p in pieces)
        assert text == whole.json()["text"] == served.variant.family.generate("def ", 12, temperature=0)
        assert httpx.post(url, json={**body, "max_new_tokens": 33}).status_code == 422
        assert httpx.post(url, json={**body, "prompt": "x" * 10_001}).status_code == 422
        assert httpx.post(f"{server.url}/v1/predict", json={"inputs": ["x"]}).status_code == 404
    finally:
        server.stop()


def test_an_unknown_variant_is_named_with_the_choices(table_run):
    result = subprocess.run(
        [sys.executable, "-m", "forgeml", "serve", str(table_run), "--variant", "fp8"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--variant fp8" in result.stderr and "onnx-int8-dynamic" in result.stderr and "trained" in result.stderr


JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=JSON, extra=st.dictionaries(st.sampled_from(["inputs", "stream", "x"]), JSON, max_size=2))
def test_no_body_gets_a_500(table_server, inputs, extra):
    body = json.dumps({"inputs": inputs, **extra})  # NaN and Infinity included, which JSON does not allow
    headers = {**AUTH, "content-type": "application/json"}
    response = httpx.post(f"{table_server.url}/v1/predict", content=body, headers=headers)
    assert response.status_code in (200, 422), (body, response.text)


def test_a_taken_port_is_named_before_the_model_loads(table_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = subprocess.run(
            [sys.executable, "-m", "forgeml", "serve", str(table_run), "--port", port],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--port {port}" in result.stderr and "choose another port" in result.stderr


class Endless(Served):
    """The real language model, sampling on and on while ``endless`` holds: a generation that only
    a stop ends. ``running`` counts the generations under way."""

    def __init__(self, served: Served) -> None:
        super().__init__(served.variant, served.version)
        self.endless, self.running = False, 0

    def stream(self, prompt, max_new_tokens, temperature, top_k):
        self.running += 1
        try:
            yield from super().stream(prompt, max_new_tokens, temperature, top_k)
            while self.endless:
                yield from super().stream(prompt, max_new_tokens, temperature, top_k)
        finally:
            self.running -= 1


def test_a_generation_that_times_out_is_stopped_before_the_504(tmp_path):
    folder = tmp_path / "lm"
    forgeml.train(LM, folder)
    endless = Endless(open_model(folder, "trained", threads=1))
    server = InProcess(endless, ServeConfig(timeout_s=0.5))
    try:
        endless.endless = True  # after the warm-up
        body = {"prompt": "def ", "max_new_tokens": 8}
        response = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
        assert response.status_code == 504
        assert endless.running == 0  # no sampling thread runs on, holding the model, after the answer
        endless.endless = False
        assert httpx.post(f"{server.url}/v1/generate", json=body, timeout=60).status_code == 200
        assert endless.running == 0
    finally:
        endless.endless = False
        server.stop()


def test_a_key_masked_in_the_runs_recipe_is_refused_and_the_real_one_given_apart(tmp_path):
    folder = tmp_path / "keyed"
    forgeml.train(
        {**TABLE, "name": "keyed", "train": {**TABLE["train"], "max_steps": 2}, "serve": {"api_key": "k3y"}}, folder
    )
    assert "k3y" not in (folder / "recipe.yaml").read_text()
    refused = subprocess.run(
        [sys.executable, "-m", "forgeml", "serve", str(folder), "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "serve.api_key" in refused.stderr and "--api-key KEY or FORGEML_API_KEY" in refused.stderr
    server = Subprocess(folder, "--variant", "trained", env={"FORGEML_API_KEY": "k3y"})
    try:
        url = f"{server.url}/v1/predict"
        assert httpx.post(url, json={"inputs": []}, headers={"Authorization": "Bearer ***"}).status_code == 401
        assert httpx.post(url, json={"inputs": []}, headers={"Authorization": "Bearer k3y"}).status_code == 422
    finally:
        server.stop()

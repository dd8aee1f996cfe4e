"""Fine-tuning a Hugging Face causal LM end to end: a tiny random Llama checkpoint with a Llama 3
style chat template, LoRA on a chat JSONL file. The export must be what plain transformers expects
(the greedy reply of AutoModelForCausalLM + apply_chat_template + generate equals forgeml's, in a
process that never imports forgeml), prepare must show what trains and refuse a row where nothing
does, and the CLI must reply to a conversation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import forgeml
from forgeml.cli import app, main
from forgeml.errors import DataError

pytestmark = pytest.mark.slow

WORDS = ["path", "file", "open", "read", "parse", "date", "socket", "send", "reply", "count", "split", "join"]
QUESTION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Explain path file"}]


def write_chat(path: Path, n: int = 120) -> Path:
    with path.open("w") as f:
        for i in range(n):
            question = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(4))
            reply = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(2 + i % 4))
            conversation = [
                {"role": "user", "content": f"Explain {question} {i}"},
                {"role": "assistant", "content": reply},
            ]
            if i % 3 == 0:
                conversation += [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "No more."}]
            f.write(json.dumps({"messages": conversation}) + "\n")
    return path


def recipe(source: Path, checkpoint: Path, **prepare) -> dict:
    return {
        "name": "sft",
        "data": {"source": str(source), "format": "chat"},
        "prepare": prepare,
        "model": {"name": "hf-causal-lm", "pretrained": str(checkpoint), "max_length": 96, "lora": {"r": 4}},
        "train": {"max_steps": 8, "global_batch_size": 8, "lr": 3e-3, "seed": 0},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("sft")
    forgeml.train(recipe(write_chat(folder / "chat.jsonl"), tiny_checkpoint("llama")), folder / "run")
    return folder / "run"


PLAIN_TRANSFORMERS = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, messages = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
new = out[0, inputs["input_ids"].shape[1]:].tolist()
stops = model.generation_config.eos_token_id
print(json.dumps({"new": new, "stops": stops, "forgeml": "forgeml" in sys.modules}))
"""


def test_plain_transformers_generates_what_forgeml_generates_and_stops_at_the_end_of_turn(run):
    model_dir = run / "train" / "model"
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(model_dir), json.dumps(QUESTION)],
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    assert plain["forgeml"] is False
    model = forgeml.load(run)
    eot = model.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in plain["stops"] and model.tokenizer.eos_token_id in plain["stops"]
    new = [t for t in plain["new"] if t not in plain["stops"]]
    assert model.chat(QUESTION, max_new_tokens=24, temperature=0) == model.tokenizer.decode(new)
    # The trained template travels with the export: the tokenizer in it renders the same text.
    assert model.tokenizer.chat_template == (run / "data" / "encoder" / "chat_template.jinja").read_text()


def test_every_compressed_variant_is_checked_by_its_greedy_continuations(run):
    overrides = (
        "compress.methods=[quantize, onnx, distill]",
        "compress.latency_runs=10",
        "compress.throughput_batches=1",
        "compress.calibration_rows=16",
        "compress.generation_prompts=3",
        "compress.generation_tokens=8",
    )
    rows = {row["name"]: row for row in forgeml.compress(run, overrides=overrides).variants}
    assert {"baseline", "torch-int8", "onnx-fp32", "onnx-int8-dynamic", "distilled", "student-alone"} <= set(rows)
    assert rows["baseline"]["greedy_agreement"] == rows["onnx-fp32"]["greedy_agreement"] == 1.0
    for row in rows.values():
        assert 0.0 <= row["greedy_agreement"] <= 1.0 and row["perplexity"] > 1.0 and 0.0 <= row["accuracy"] <= 1.0


def test_the_next_token_is_explained_over_the_prompt_and_scored_by_deletion(run):
    result = forgeml.explain(run, overrides=("explain.n=2", "explain.ig_steps=8", "explain.random_orders=2"))
    assert set(result.methods) == {"ig"} and result.methods["ig"]["n"] == 2
    record = result.records[0]
    assert record["input"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")  # the prompt, no reply
    assert len(record["attributions"]["ig"]) == len(record["units"]) and abs(record["ig_delta"]) < 0.05
    named = forgeml.explain(run, overrides=("explain.n=1", "explain.ig_steps=4", "explain.continuation=path file"))
    assert named.records[0]["predicted"] == "path file"


def test_prepare_records_what_trains_and_the_report_shows_it(run):
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    trained = [text for text, is_trained in manifest["example"] if is_trained]
    assert trained and all(text.endswith("<|eot_id|>") for text in trained)
    report = forgeml.report(run).read_text()
    assert "What trains" in report and "<mark>" in report


def test_a_row_where_nothing_trains_is_named_by_its_line(tmp_path, tiny_checkpoint):
    source = write_chat(tmp_path / "chat.jsonl", 40)
    lines = source.read_text().splitlines()
    lines[5] = json.dumps({"messages": [{"role": "user", "content": "a question with no reply"}]})
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"row 5 \(line 6\): no token of it is trained"):
        forgeml.prepare(recipe(source, tiny_checkpoint("llama")), tmp_path / "run")


def test_the_cli_replies_to_a_conversation(run, tmp_path, capsys):
    conversation = tmp_path / "conversation.json"
    conversation.write_text(json.dumps(QUESTION))
    args = ["generate", str(run), "--chat", str(conversation), "--temperature", "0", "--max-new-tokens", "24"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    reply = forgeml.load(run).chat(QUESTION, max_new_tokens=24, temperature=0)
    assert reply in result.stdout
    piped = CliRunner().invoke(app, [*args[:3], "-", *args[4:]], input=json.dumps(QUESTION))  # --chat -: stdin
    assert piped.exit_code == 0 and reply in piped.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"role": "robot", "content": "hi"}]))
    with pytest.raises(SystemExit) as exit:
        main(["generate", str(run), "--chat", str(bad)])
    assert exit.value.code == 2
    assert "role 'robot' is not one of system, user, assistant" in capsys.readouterr().err

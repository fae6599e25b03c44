"""The command line: the README's main job, and every bad input as a one-line error, exit 2."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peakc.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "llama"
    assert main(["compile", "demo:llama", "-o", str(out)]) == 0
    return out


def test_compile_run_inspect(compiled, capsys, tmp_path):
    capsys.readouterr()
    assert main(["run", str(compiled), "--output", str(tmp_path / "o.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "output_0: float32[1, 16, 256]" in out
    assert (tmp_path / "o.safetensors").is_file()
    assert main(["inspect", str(compiled)]) == 0
    out = capsys.readouterr().out
    assert "pipeline   cleanup,fuse" in out and "fused.rms_norm=5" in out
    assert main(["inspect", str(compiled), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["manifest"]["backend"] == "eager"


def test_run_with_input_file(compiled, capsys, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"input_0": torch.arange(16).reshape(1, 16)}, str(tmp_path / "in.safetensors"))
    assert main(["run", str(compiled), "--input", str(tmp_path / "in.safetensors")]) == 0
    assert "output_0" in capsys.readouterr().out


def test_passes_lists_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "cleanup" in out and "fuse" in out and "rules: str = all" in out


def test_plugin_pass_through_cli(tmp_path, capsys):
    out = tmp_path / "custom"
    plugin = ROOT / "examples" / "custom_pass.py"
    args = [
        "compile",
        "demo:llama",
        "-o",
        str(out),
        "--plugin",
        str(plugin),
        "--pipeline",
        "cleanup,count_ops{fold_mul_one=true},fuse",
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][1]["name"] == "count_ops"
    assert report["passes"][1]["stats"]["ops.linear.default"] == 15
    assert main(["passes", "--plugin", str(plugin)]) == 0
    assert "count_ops" in capsys.readouterr().out


def test_py_source_and_dump_ir(tmp_path):
    model_file = tmp_path / "mymodel.py"
    model_file.write_text(
        textwrap.dedent("""
        import torch

        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), (torch.randn(2, 8),)
    """)
    )
    dump = tmp_path / "ir"
    out = tmp_path / "o"
    assert main(["compile", f"py:{model_file}:build", "-o", str(out), "--dump-ir", str(dump)]) == 0
    assert (dump / "000_captured.txt").is_file() and (dump / "002_fuse.txt").is_file()


BAD_INPUTS = [
    (["compile", "demo:llama", "-o", "{tmp}/x", "--pipeline", "nosuch"], "unknown pass 'nosuch'"),
    (
        ["compile", "demo:llama", "-o", "{tmp}/x", "--pipeline", "fuse{color=red}"],
        "pass 'fuse' has no option 'color'",
    ),
    (
        ["compile", "demo:llama", "-o", "{tmp}/x", "--pipeline", "cleanup,{"],
        "malformed pipeline spec at column 9",
    ),
    (["compile", "gguf:{tmp}/missing.gguf", "-o", "{tmp}/x"], "GGUF file not found"),
    (["compile", "hf:{tmp}", "-o", "{tmp}/x"], "is not a Hugging Face model folder"),
    (["compile", "demo:nosuch", "-o", "{tmp}/x"], "unknown demo"),
    (["compile", "weird", "-o", "{tmp}/x"], "expected KIND:VALUE"),
    (["compile", "demo:mlp", "-o", "{tmp}/x", "--target", "tpu-v9"], "unknown target 'tpu-v9'"),
    (["run", "{tmp}/nothing"], "artifact folder not found"),
    (["run", "{tmp}", "--input", "{tmp}/none.safetensors"], "manifest.json is missing"),
    (
        ["compile", "demo:mlp", "-o", "{tmp}/x", "--plugin", "{tmp}/none.py"],
        "plug-in file not found",
    ),
    (
        ["compile", "demo:llama", "-o", "{tmp}/x", "--pipeline", ""],
        "--pipeline is empty: name 'none' to run no passes",
    ),
    (["compile", "demo:llama", "-o", "{tmp}/x", "--seq-len", "0"], "--seq-len must be at least 1"),
    (["compile", "demo:llama", "-o", "{tmp}/x", "--seq-len", "-5"], "at least 1, got -5"),
    (
        ["compile", "demo:llama", "-o", "{tmp}/x", "--seq-len", "100000"],
        "--seq-len 100000 exceeds demo:llama's limit of 128 positions",
    ),
    (["eval", "demo:llama", "--ppl", "{tmp}", "--seq-len", "0"], "--seq-len must be at least 2"),
    (["eval", "demo:llama", "--ppl", "{tmp}", "--seq-len", "-5"], "at least 2"),
    (
        ["eval", "demo:llama", "--ppl", "{tmp}", "--seq-len", "100000"],
        "exceeds demo:llama's limit of 128 positions",
    ),
    (["run", "{tmp}/nothing", "--threads", "0"], "--threads must be at least 1, got 0"),
    (
        ["compile", "demo:mlp", "-o", "{tmp}/x", "--dtype", "float64"],
        "unknown --dtype 'float64' (known: auto, float32",
    ),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("peakc: error: ")
    assert not (tmp_path / "x").exists()


def test_unexportable_model(tmp_path, capsys):
    model_file = tmp_path / "bad.py"
    model_file.write_text(
        textwrap.dedent("""
        import torch

        class Bad(torch.nn.Module):
            def forward(self, x):
                return x.nonzero().sum() if x.sum() > 0 else x

        def build():
            return Bad(), (torch.randn(4),)
    """)
    )
    assert main(["compile", f"py:{model_file}:build", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "cannot export py:" in err and "bad.py:6 in forward" in err
    assert not (tmp_path / "x").exists()


def test_existing_output_needs_force(compiled, capsys):
    assert main(["compile", "demo:llama", "-o", str(compiled)]) == 2
    assert "already exists (use --force" in capsys.readouterr().err


def test_tampered_artifact_via_cli(compiled, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(compiled, copy)
    (copy / "report.md").write_text("edited")
    assert main(["run", str(copy)]) == 2
    assert "report.md was changed" in capsys.readouterr().err
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 3
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(copy)]) == 2
    assert "format version 3" in capsys.readouterr().err


def test_failing_pass_leaves_reproducer_not_artifact(tmp_path, capsys):
    plugin = tmp_path / "boom.py"
    plugin.write_text(
        textwrap.dedent('''
        import peakc

        @peakc.register_pass
        class Boom(peakc.Pass):
            """Fails."""
            name = "boom"

            def run(self, graph, ctx):
                raise ValueError("no good")
    ''')
    )
    out = tmp_path / "out"
    argv = [
        "compile",
        "demo:mlp",
        "-o",
        str(out),
        "--plugin",
        str(plugin),
        "--pipeline",
        "cleanup,boom,fuse",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pass 'boom' (#2) failed after [cleanup]: no good" in err
    assert not out.exists()
    repro = tmp_path / "out.reproducer"
    assert (repro / "pipeline.txt").read_text().strip() == "boom,fuse"
    # The reproducer's program compiles again from the artifact: source.
    assert (
        main(
            [
                "compile",
                f"artifact:{repro / 'program'}",
                "-o",
                str(tmp_path / "again"),
                "--pipeline",
                "fuse",
            ]
        )
        == 0
    )


def test_console_script_and_debug(tmp_path):
    """The installed entry point: exit code 2 and one line; --debug shows the traceback."""
    base = [sys.executable, "-m", "peakc.cli"]
    plain = subprocess.run(
        [*base, "compile", "demo:mlp", "-o", str(tmp_path / "x"), "--pipeline", "nosuch"],
        capture_output=True,
        text=True,
    )
    assert plain.returncode == 2
    assert (
        plain.stderr.strip().splitlines() == [plain.stderr.strip()]
        and "Traceback" not in plain.stderr
    )
    debug = subprocess.run(
        [
            *base,
            "--debug",
            "compile",
            "demo:mlp",
            "-o",
            str(tmp_path / "x"),
            "--pipeline",
            "nosuch",
        ],
        capture_output=True,
        text=True,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# --- nothing destroyed, every bad input named, eval and threads on every artifact (issue 22) ---


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """demo:llama compiled for generation, as the README builds it."""
    out = tmp_path_factory.mktemp("cli") / "llama-gen"
    argv = ["compile", "demo:llama", "-o", str(out), "--task", "generate", "--max-seq-len", "128"]
    assert main([*argv, "--max-batch", "2"]) == 0
    return out


@pytest.fixture
def torch_threads():
    """The runtime commands set torch's thread count for the process: restore it after."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def assert_one_line_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("peakc: error: ")


def test_force_refuses_a_folder_of_user_files(tmp_path, capsys):
    import peakc
    from peakc.errors import PeakcError
    from peakc.models.demo import demo_mlp

    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("years of work")
    (folder / "sub" / "data.csv").write_text("1,2")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    assert main(["compile", "demo:mlp", "-o", str(folder), "--force"]) == 2
    assert_one_line_error(capsys, f"output folder {folder} is not a peakc artifact")
    # A manifest.json that is not peakc's does not make it an artifact either.
    (folder / "manifest.json").write_text('{"name": "my web app"}')
    assert main(["compile", "demo:mlp", "-o", str(folder), "--force"]) == 2
    assert_one_line_error(capsys, "--force replaces only peakc artifacts")
    # The Python API's save(force=True) refuses the same way.
    compiled = peakc.compile(*demo_mlp(), pipeline="none")
    with pytest.raises(PeakcError, match="is not a peakc artifact"):
        compiled.save(folder, force=True)
    after = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    assert after == sorted([*before, Path("manifest.json")])
    assert (folder / "thesis.txt").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]  # no staging folder left


def test_force_refuses_a_plain_file(tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"\x00user data")
    assert main(["compile", "demo:mlp", "-o", str(target), "--force"]) == 2
    assert_one_line_error(capsys, f"output {target} is a file, not a peakc artifact")
    assert target.read_bytes() == b"\x00user data"


def test_force_replaces_a_peakc_artifact(tmp_path):
    out = tmp_path / "mlp"
    assert main(["compile", "demo:mlp", "-o", str(out)]) == 0
    assert main(["compile", "demo:mlp", "-o", str(out), "--force", "--pipeline", "cleanup"]) == 0
    assert json.loads((out / "manifest.json").read_text())["pipeline"] == "cleanup"


def test_py_source_that_raises_names_file_and_function(tmp_path, capsys):
    model_file = tmp_path / "broken.py"
    model_file.write_text(
        textwrap.dedent("""
        def helper():
            raise RuntimeError("boom")

        def build():
            return helper()
    """)
    )
    assert main(["compile", f"py:{model_file}:build", "-o", str(tmp_path / "x")]) == 2
    assert_one_line_error(capsys, "build() raised RuntimeError at broken.py:3 in helper: boom")
    assert not (tmp_path / "x").exists()


def test_output_under_a_file_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import peakc.models

    def load_source_for_task(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(peakc.models, "load_source_for_task", load_source_for_task)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub" / "out"
    assert main(["compile", "demo:llama", "-o", str(out)]) == 2
    assert_one_line_error(capsys, f"cannot write {out}: {tmp_path / 'afile'} is not a folder")


def test_unwritable_output_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import types

    import peakc.models

    def load_source_for_task(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(peakc.models, "load_source_for_task", load_source_for_task)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: show the check what a user would get
        fake_os = types.SimpleNamespace(
            access=lambda path, mode: Path(path) != locked, W_OK=os.W_OK, X_OK=os.X_OK
        )
        monkeypatch.setattr("peakc.cli.os", fake_os)
    try:
        assert main(["compile", "demo:llama", "-o", str(locked / "out")]) == 2
    finally:
        locked.chmod(0o755)
    assert_one_line_error(capsys, f"cannot write {locked / 'out'}: no permission to write in")


def test_binary_eval_text_is_refused(tmp_path, capsys):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    assert main(["eval", "demo:llama", "--ppl", str(blob)]) == 2
    assert_one_line_error(capsys, f"text data {blob} is a binary file")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait ".encode("latin-1") * 20)
    assert main(["eval", "demo:llama", "--ppl", str(latin)]) == 2
    assert_one_line_error(capsys, f"text data {latin} is not UTF-8 text (byte 3 is 0xe9)")


def test_prompt_ids_outside_the_vocabulary(decoder, capsys, torch_threads):
    assert main(["generate", str(decoder), "--prompt-ids", "1 2 300"]) == 2
    assert_one_line_error(capsys, "prompt 0: token id 300 is outside the vocabulary (0..255)")
    assert main(["generate", str(decoder), "--prompt-ids", "4", "--prompt-ids", "-1 2"]) == 2
    assert_one_line_error(capsys, "prompt 1: token id -1 is outside the vocabulary")


def perplexity_of(line: str) -> float:
    return float(line.split("perplexity ")[1].split()[0])


def test_eval_scores_a_generation_artifact_like_its_forward_program(
    decoder, tmp_path, capsys, torch_threads
):
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "README.md").read_text()[:3000])
    forward = tmp_path / "forward"
    assert main(["compile", "demo:llama", "-o", str(forward), "--seq-len", "32"]) == 0
    capsys.readouterr()
    assert main(["eval", str(forward), "--ppl", str(text)]) == 0
    want = capsys.readouterr().out
    assert main(["eval", str(decoder), "--ppl", str(text), "--seq-len", "32"]) == 0
    got = capsys.readouterr().out
    windows = re.search(r"over (\d+) windows of 32 tokens", want)  # README text: count varies
    assert windows and int(windows.group(1)) > 50 and windows.group(0) in got
    assert perplexity_of(got) == pytest.approx(perplexity_of(want), rel=1e-5)
    assert main(["eval", str(decoder), "--ppl", str(text)]) == 0  # windows as long as the cache
    assert "windows of 128 tokens" in capsys.readouterr().out
    assert main(["eval", str(decoder), "--ppl", str(text), "--seq-len", "129"]) == 2
    assert_one_line_error(capsys, "--seq-len 129 exceeds artifact:")


def test_eval_scores_an_ort_generation_artifact(decoder, tmp_path, capsys, torch_threads):
    pytest.importorskip("onnxruntime")
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "README.md").read_text()[:3000])
    out = tmp_path / "ort-gen"
    argv = ["compile", "demo:llama", "-o", str(out), "--backend", "ort", "--task", "generate"]
    assert main([*argv, "--max-seq-len", "64", "--max-batch", "2"]) == 0
    capsys.readouterr()
    assert main(["eval", str(decoder), "--ppl", str(text), "--seq-len", "64"]) == 0
    want = capsys.readouterr().out
    assert main(["eval", str(out), "--ppl", str(text), "--seq-len", "64"]) == 0
    got = capsys.readouterr().out
    assert "windows of 64 tokens" in got
    assert perplexity_of(got) == pytest.approx(perplexity_of(want), rel=1e-4)


def test_threads_option_and_default(decoder, tmp_path, capsys, torch_threads):
    import torch

    from peakc.runtime.threads import default_threads, usable_cpus

    assert 1 <= default_threads() <= len(usable_cpus())
    assert main(["run", str(decoder), "--threads", "1"]) == 0
    assert "threads: 1" in capsys.readouterr().out and torch.get_num_threads() == 1
    assert main(["generate", str(decoder), "--prompt-ids", "1 2 3", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    threads = default_threads()
    assert f"tokens/s on cpu, {threads} CPU thread" in err
    assert torch.get_num_threads() == threads
    bench = ["bench", str(decoder), "--prompt-len", "4", "--gen-len", "2", "--repeats", "1"]
    assert main([*bench, "--json", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["threads"] == 1
    assert main([*bench, "--threads", "1"]) == 0
    assert "on cpu (1 CPU thread)" in capsys.readouterr().out
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "README.md").read_text()[:1000])
    assert main(["eval", str(decoder), "--ppl", str(text), "--threads", "1"]) == 0
    assert "(bytes tokenizer, 1 CPU thread)" in capsys.readouterr().out


def test_dtype_auto_keeps_the_sources_own(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import torch

    import peakc

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    folder = tmp_path / "bf16-llama"
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    out = tmp_path / "auto"
    assert main(["compile", f"hf:{folder}", "-o", str(out), "--pipeline", "none"]) == 0
    assert "weights: bfloat16 (auto: the source's own dtype)" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["dtype"] == "bfloat16"
    assert "weights: bfloat16" in (out / "report.md").read_text()
    assert {w.dtype for w in peakc.load(out).weights.values()} == {torch.bfloat16}
    out = tmp_path / "fp32"
    argv = ["compile", f"hf:{folder}", "-o", str(out), "--pipeline", "none", "--dtype", "float32"]
    assert main(argv) == 0
    assert "weights: float32 (--dtype float32)" in capsys.readouterr().err
    assert {w.dtype for w in peakc.load(out).weights.values()} == {torch.float32}
    out = tmp_path / "demo"
    assert main(["compile", "demo:mlp", "-o", str(out), "--pipeline", "none"]) == 0
    assert "weights: float32 (auto: the source's own dtype)" in capsys.readouterr().err


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_chat_model(folder: Path, chat_template: str | None) -> Path:
    """A one-layer random Llama with a byte-level tokenizer (258 tokens), with or without a
    chat template, saved as a Hugging Face folder."""
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=chat_template,
    )
    config = transformers.LlamaConfig(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_generate_chat_applies_the_stored_template(tmp_path, capsys, monkeypatch, torch_threads):
    from peakc.runtime.generate import Generator

    folder = tiny_chat_model(tmp_path / "chat-llama", CHAT_TEMPLATE)
    out = tmp_path / "chat"
    argv = ["compile", f"hf:{folder}", "-o", str(out), "--task", "generate"]
    assert main([*argv, "--max-seq-len", "64", "--max-batch", "2", "--pipeline", "none"]) == 0
    assert (out / "tokenizer" / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    seen = []
    generate_text = Generator.generate_text

    def record(self, prompts, config, on_text=None):
        seen.extend(prompts)
        return generate_text(self, prompts, config, on_text)

    monkeypatch.setattr(Generator, "generate_text", record)
    capsys.readouterr()
    assert main(["generate", str(out), "--chat", "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    assert seen == ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    captured = capsys.readouterr()
    assert not captured.out.startswith("Hi") and "tokens/s on cpu" in captured.err
    assert main(["generate", str(out), "--chat", "--prompt-ids", "1 2"]) == 2
    assert_one_line_error(capsys, "--chat applies to --prompt text, not to --prompt-ids")


def test_generate_chat_without_a_template_is_one_line(tmp_path, capsys, torch_threads):
    folder = tiny_chat_model(tmp_path / "plain-llama", None)
    out = tmp_path / "plain"
    argv = ["compile", f"hf:{folder}", "-o", str(out), "--task", "generate"]
    assert main([*argv, "--max-seq-len", "64", "--max-batch", "2", "--pipeline", "none"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--chat", "--prompt", "Hi"]) == 2
    assert_one_line_error(capsys, f"{out}'s tokenizer has no chat template: drop --chat")


def test_generate_artifact_with_a_batch_of_one(tmp_path, capsys):
    """--max-batch 1 makes the batch static (torch.export refuses a dim of range 1..1)."""
    out = tmp_path / "b1"
    argv = ["compile", "demo:llama", "-o", str(out), "--task", "generate", "--pipeline", "none"]
    assert main([*argv, "--max-seq-len", "32", "--max-batch", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"]["max_batch"] == 1
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt-ids", "1 2 3", "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.split()) == 3

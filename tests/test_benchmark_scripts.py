"""The scripts of benchmarks/ that docs/results.md quotes: summary_table.py (its tables: cells are mean ± std
of the first alternative metric a recipe has), beam_search.py, attention_cpu.py and throughput.py run, and a
mistake is one line."""
import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *map(str, args)], capture_output=True, text=True)


def table(*args) -> subprocess.CompletedProcess:
    return script("summary_table.py", *args)


def test_cells_take_each_recipes_own_metric_and_mistakes_are_one_line(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({
        "clip@100": {"zeroshot:s/top1": {"mean": 90.04, "std": 1.26, "n": 3}},
        "cap@100": {"zeroshot_captioner:s/top1": {"mean": 12.5, "std": 0.0, "n": 1}},
        "clip@50": {"zeroshot:s/top1": {"mean": 80.0, "std": 0.0, "n": 1}},
    }))
    out = table(summary, "zero-shot=zeroshot:s/top1|zeroshot_captioner:s/top1", "R@1=retrieval:s/t2i_R@1", "--budget", 100)
    assert out.returncode == 0
    assert out.stdout.splitlines()[2:] == ["| clip | 90.0 ± 1.3 | – |", "| cap | 12.5 | – |"]
    for bad, said in ((["/nope/summary.json", "a=b"], "/nope/summary.json"), ([summary, "zero-shot"], "LABEL=METRIC")):
        out = table(*bad)
        assert out.returncode == 1 and out.stderr.startswith("error: ") and said in out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1


def test_beam_search_benchmark_writes_every_images_caption(tmp_path):
    out = script("beam_search.py", tmp_path / "captions.json")
    assert out.returncode == 0 and out.stdout.startswith("generate: ")
    captions = json.loads((tmp_path / "captions.json").read_text())
    assert len(captions) == 32 and all(1 <= len(c) <= 20 for c in captions)
    missing = script("beam_search.py")
    assert missing.returncode == 1 and missing.stderr.startswith("error: give the output file")


def test_attention_benchmark_times_both_paths_and_refuses_a_bad_shape():
    out = script("attention_cpu.py", "--shapes", "2x2x9x8", "2x2x7x8:causal", "--repeats", 1)
    assert out.returncode == 0
    rows = out.stdout.splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| 2x2x9x8", "| 2x2x7x8:causal"]
    bad = script("attention_cpu.py", "--shapes", "2x2x9")
    assert bad.returncode == 1 and bad.stdout == "" and bad.stderr.startswith("error: --shapes '2x2x9'")


def test_throughput_gives_the_peers_caption_lengths_and_trims_their_padding():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from throughput import peer_caption_words
    finally:
        sys.path.remove(str(BENCHMARKS))
    # ../shared/peers/open_clip/bench.py's first captions, tokenised by open_clip: 16, 8, 10, 4, 6 words
    assert peer_caption_words(64)[:5] == [16, 8, 10, 4, 6] and max(peer_caption_words(64)) == 20
    out = script("throughput.py", "--recipe", "coca", "--preset", "micro", "--batch", 4, "--vocab", 300,
                 "--precision", "fp32", "--warmup", 0, "--steps", 1, "--peer-captions", "model.text.context_length=48")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    # the longest caption, 16 words + <sot> + <eot>, rounded up to a multiple of 8
    assert result["text_length"] == 24 and result["samples_per_s"] > 0

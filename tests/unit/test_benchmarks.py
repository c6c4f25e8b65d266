"""eval.benchmarks before any work: task files load with their data beside them, only
generate_until tasks are accepted, the gate's guardrails on their metrics have a direction,
and generations are cut at the task's stop strings. (Scored through Ray Data with the hf
engine, candidate against champion: tests/integration/test_benchmarks.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmflow.config_eval import BenchmarksConfig
from llmflow.errors import ConfigError
from llmflow.evaluate.benchmarks import cut_at_stop, load_task_file, task_directions

ROOT = Path(__file__).resolve().parents[2]
REVERSE = "llmflow/bundled/lm_eval/llmflow_reverse.yaml"


def test_the_bundled_task_file_loads_with_its_data_made_absolute():
    config = load_task_file(str(ROOT / REVERSE))
    data = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data.is_file() and len(data.read_text().splitlines()) == 32
    assert config["task"] == "llmflow_reverse" and config["output_type"] == "generate_until"
    dirs = task_directions(BenchmarksConfig(tasks=[str(ROOT / REVERSE), "gsm8k"]))
    assert dirs == {"llmflow_reverse/exact_match": "higher", "gsm8k/*": "higher"}


def test_what_cannot_run_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^eval.benchmarks.tasks: nope.yaml: no such task file$"):
        load_task_file("nope.yaml")
    mc = tmp_path / "mc.yaml"
    mc.write_text("task: mc\noutput_type: multiple_choice\n")
    with pytest.raises(ConfigError, match=r"mc.yaml: output_type multiple_choice \(llmflow scores"):
        load_task_file(str(mc))
    nameless = tmp_path / "x.yaml"
    nameless.write_text("output_type: generate_until\n")
    with pytest.raises(ConfigError, match=r"x.yaml: a task file needs a 'task' name$"):
        load_task_file(str(nameless))


def test_guardrails_on_benchmark_metrics_pass_the_preflight_and_unknown_ones_do_not():
    from llmflow.configfile import load_config
    from llmflow.preflight import check_config

    bench = f"eval.benchmarks={{tasks: [{REVERSE}, gsm8k]}}"
    ok = ["gate.guardrails={llmflow_reverse/exact_match: 0.05, gsm8k/exact_match: 0.02}"]
    check_config(load_config("configs/tiny.yaml", [bench, *ok]), "pipeline")
    bad = load_config("configs/tiny.yaml", [bench, "gate.guardrails={llmflow_reverse/acc: 0.1}"])
    with pytest.raises(ConfigError, match=r"^gate.guardrails.llmflow_reverse/acc: 'llmflow_rev"):
        check_config(bad, "pipeline")


def test_generations_are_cut_at_the_first_stop_string():
    assert cut_at_stop("4321\nQ: next", ["\n"]) == "4321"
    assert cut_at_stop("ab</s>cd\n", ["\n", "</s>"]) == "ab"
    assert cut_at_stop("abc", "") == "abc" and cut_at_stop("abc", None) == "abc"

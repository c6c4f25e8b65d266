"""The finetune stage: supervised fine-tuning on Ray Train, resumable, registered with lineage.

llmflow run finetune --config configs/tiny.yaml [--set train.max_steps=50]
"""

from __future__ import annotations

from prefect import flow
from prefect_ray.context import remote_options

from flows.prepare import prepare_stage
from llmflow.cluster import ClusterTaskRunner
from llmflow.config import PipelineConfig
from llmflow.configfile import default_config
from llmflow.finetune.checks import check_inputs
from llmflow.preflight import check_flow
from llmflow.prepare.sources import source_files
from llmflow.progress import listening
from llmflow.refs import DatasetRef, ModelRef, TrainRun
from llmflow.runs import flow_run_id
from llmflow.terminal import stage
from tasks.finetune import register_model, train_model
from tasks.prepare import base_model


def finetune_stage(
    config: PipelineConfig, dataset: DatasetRef, model_uri: str
) -> tuple[TrainRun, ModelRef]:
    """train-model, then register-model: (the training run, the registered version)."""
    # The trainer's workers hold the resources; the terminal draws their steps (progress).
    with listening(flow_run_id()) as steps, remote_options(num_cpus=0, num_gpus=0):
        run = steps.wait(train_model.submit(config.train, dataset, model_uri), "train", "train")
    lineage = config.model_dump(mode="json")
    ref = register_model.submit(config.train, dataset, model_uri, run, lineage).result()
    stage("finetune", train_line(ref, run))
    return run, ref


def train_line(ref: ModelRef, run: TrainRun) -> str:
    m = run.metrics
    how = "reused a finished run" if run.reused else f"{m.get('fit_s', 0):.0f} s on {run.device}"
    return (
        f"{ref.name}:{ref.version}: loss {m.get('train_loss_first', float('nan')):.3f} -> "
        f"{m.get('train_loss_last', float('nan')):.3f} in {m.get('steps', 0):.0f} steps ({how})"
    )


@flow(name="finetune", task_runner=ClusterTaskRunner(), log_prints=True)
def finetune(
    config: PipelineConfig = default_config(), dataset: DatasetRef | None = None
) -> ModelRef:
    """Fine-tune ``config.train.base_model`` on ``dataset`` (prepared here when not given).

    Stages:
        1. base-model: resolve the base model (the tiny model is built once and kept)
        2. prepare-dataset (only without ``dataset``): as the prepare flow, cached
        3. train-model (on Ray): a TorchTrainer run keyed by its inputs, so a re-run resumes
           from its latest checkpoint; the task itself reserves no CPU or GPU, the trainer's
           workers do (ray issue #32856)
        4. register-model: the final checkpoint as a HF directory, a new registry version with
           its lineage, the loss curve as artifacts
    """
    check_inputs(config.train, dataset)  # bad model or dataset fails here, before cluster work
    check_flow(config, "finetune")  # and workers that could never be placed
    if dataset is None:
        source_files(config.data.source)
        model_uri, dataset = prepare_stage(config)
    else:
        model_uri = base_model.submit(config.train).result()
    return finetune_stage(config, dataset, model_uri)[1]

"""Safe RLHF-V on Kubeflow: align multimodal LLMs for helpfulness under a harm budget.

Importing the package switches off the usage telemetry of the libraries it drives (MLflow,
Great Expectations, Hugging Face, DeepSpeed's dependencies) before any of them is imported, so no
run phones home from a cluster or a laptop. It also makes idle OpenMP threads sleep instead of
spin: on a shared CPU, spinning threads made training 4x slower. Explicit settings in the
environment win. great-expectations' import-time INFO chatter is silenced, and so is DeepSpeed's
"Setting accelerator to CPU" warning, which every CPU process repeats, unless `safe-rlhf-v --verbose`
set SAFE_RLHF_V_VERBOSE=1 (`progress.VERBOSE_ENV`).
"""

import logging
import os

__version__ = "0.1.0"

_TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
}
for _key, _value in _TELEMETRY_OFF.items():
    os.environ.setdefault(_key, _value)

# great-expectations logs a few hundred INFO lines while it imports; they bury every stage's output.
logging.getLogger("great_expectations").setLevel(logging.WARNING)
# A filter on the logger, which DeepSpeed's own setup (level, handler) leaves in place; it reads the
# environment per record, since `--verbose` sets it after this import.
logging.getLogger("DeepSpeed").addFilter(
    lambda record: (
        os.environ.get("SAFE_RLHF_V_VERBOSE") == "1"
        or not record.getMessage().startswith("Setting accelerator to CPU")
    )
)

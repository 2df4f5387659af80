"""Safe RLHF-V on Kubeflow: align multimodal LLMs for helpfulness under a harm budget.

Importing the package switches off the usage telemetry of the libraries it drives (MLflow,
Great Expectations, Hugging Face, DeepSpeed's dependencies) before any of them is imported, so no
run phones home from a cluster or a laptop. It also makes idle OpenMP threads sleep instead of
spin: on a shared CPU, spinning threads made training 4x slower. Explicit settings in the
environment win. great-expectations' import-time INFO chatter is silenced.
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

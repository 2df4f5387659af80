"""The code MLflow runs to build a registered model's pyfunc ("models from code": nothing is pickled).

It names the installed class instead of unpickling an object from the artifact store; the role and
the weights' folder come from the model config it is loaded with (`mlflow_models`).
"""

from mlflow.models import set_model

from safe_rlhf_v.mlflow_models import SafeRlhfVModel

set_model(SafeRlhfVModel())

"""Operations on a cluster: the Kubeflow Pipelines client commands and multi-GPU / multi-node launch."""

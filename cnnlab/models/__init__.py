"""Model definitions. Importing this package registers every model."""

from cnnlab.models import cifar_cnn, lenet, recurrent, resnet, simple_cnn  # noqa: F401  (registration side effect)
from cnnlab.models.registry import all_models, count_parameters, create_model, get_model_spec

__all__ = ["all_models", "count_parameters", "create_model", "get_model_spec"]

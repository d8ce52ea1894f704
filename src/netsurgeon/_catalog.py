"""Names the command line shows before anything heavy is imported (no torch here)."""

DATASETS = ("digits", "mnist", "fashion-mnist", "imagefolder", "npz", "tokens", "text", "stdlib")
METRICS = ("accuracy", "perplexity")
MODEL_NAMES = ("lenet300", "lenet5", "mlpnet", "digits_cnn", "resnet_small", "vgg_small", "mlp_bn", "lenet5_bn",
               "mlp_dropout", "gpt")

"""Weight reparameterizations on ``torch.nn.utils.parametrize``, one file per method."""

"""The PyTorch port of the notebook (``shared/seed/notebook.txt``): an independent reference for jaxcf.

``reference_torch.notebook`` holds the notebook's code (data steps, models, ``fit``, ``validate``),
``reference_torch.weights`` the safetensors weight exchange with jaxcf, and ``reference_torch.train``
the command line. Nothing in this package imports jaxcf.
"""

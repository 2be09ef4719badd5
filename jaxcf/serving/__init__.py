"""A trained model in use: the export, inference, fold-in, held-out evaluation, the HTTP server and
reports. It imports no training code."""

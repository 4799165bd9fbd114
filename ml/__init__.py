"""The trust model's pipeline: collect labelled feature windows, train the SVM, ship it as ONNX.

`collect` runs chaos on loopback clusters (or attaches to a running balancer's
Prometheus), `dataset` is the Parquet file of labelled windows, `train` searches, compares
and exports the model with its `card`, `publish` puts it in the ConfigMap the balancer
mounts. The shipped model and its card live in `models/`.
"""

"""Ray- and MLflow-aware commands of resnet-ray: prepare, data, train, tune, evaluate, bench."""

"""mimood: unsupervised anomaly detection in brain MRI with MIM-OOD."""
__version__ = "0.1.0"

"""The fraud-detection demo: card transactions, delayed chargeback labels, and the simulator
that generates its data with drift and fault switches (``usecases.fraud.simulator``)."""

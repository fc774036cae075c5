"""The food-delivery-time demo (see usecase.yaml)."""

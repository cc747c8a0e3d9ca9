"""What every node of the pack shares: the category root and small helpers."""

PACK_NAME = "AsynDM & FPDM"
CATEGORY_ASYNDM = f"{PACK_NAME}/AsynDM"
CATEGORY_FPDM = f"{PACK_NAME}/FPDM"

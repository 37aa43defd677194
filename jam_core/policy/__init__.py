"""The policies' side of the core: one scan into records, the plan (merge, carry out), pins.
"""

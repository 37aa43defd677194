"""The cd hook's Python side: the index of stubbed directories the shells read, the visit
marks they leave, and what a visit fetches.
"""

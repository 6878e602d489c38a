"""Where annotator disagreement per task category lives in Redis.

The aggregator writes 1 - Gwet's AC1 of the recent verdicts of each category into this hash; the
worker's labeler reads it as the category's controversiality.
"""

DISAGREEMENT_KEY = "prefstream:category:disagreement"

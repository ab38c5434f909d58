"""A python connector source whose rows hold floats JSON cannot write (NaN, infinities), as sensor data can."""
from __future__ import annotations


def readings():
    """Four rows: a NaN, both infinities and a plain float."""
    import dlt

    @dlt.resource(name="readings")
    def rows():
        yield [{"id": 1, "value": float("nan")}, {"id": 2, "value": float("inf")},
               {"id": 3, "value": float("-inf")}, {"id": 4, "value": 1.5}]

    return rows

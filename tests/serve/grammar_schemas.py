"""JSON schemas for the structured-output tests: nested objects, enums, arrays, numbers,
required fields, $defs/$ref and anyOf; bounded (maxLength, maxItems, number ranges) so a random
tiny model can finish them in a few dozen tokens."""

from __future__ import annotations

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["name", "address", "active"],
    },
    "enum": {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "label": {"type": "string", "enum": ["spam", "ham"]},
            "flag": {"const": "yes"},
        },
        "required": ["sentiment", "label", "flag"],
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 8},
                "minItems": 1,
                "maxItems": 3,
            },
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50}},
                    "required": ["x"],
                },
                "maxItems": 2,
            },
        },
        "required": ["tags", "points"],
    },
    "numbers": {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "count": {"type": "integer", "minimum": 1, "maximum": 999},
            "temp": {"type": "number", "exclusiveMinimum": -40, "maximum": 60},
        },
        "required": ["score", "count", "temp"],
    },
    "refs": {
        "$defs": {"Color": {"enum": ["red", "green", "blue"]}},
        "type": "object",
        "properties": {
            "primary": {"$ref": "#/$defs/Color"},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0, "maximum": 9}]},
            "note": {"type": "string", "maxLength": 10},
        },
        "required": ["primary", "maybe"],
    },
}
# A document no row can finish in a few tokens (finish_reason must then be "length").
LONG = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 60, "maxLength": 80}},
    "required": ["text"],
}

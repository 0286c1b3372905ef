"""Healthcare integration middleware: HL7 v2, FHIR, batch and REST in; versioned CloudEvents out."""

__version__ = "0.1.0"

"""The lifecycle engine: the supervisor (:mod:`.supervisor`), tunnel
bring-up as effects (:mod:`.tunnel`, :mod:`.effects`), the undo stack
(:mod:`.undo`), the routing plan (:mod:`.routing`), the journal and crash
recovery (:mod:`.journal`, :mod:`.recovery`) and the instance lock
(:mod:`.lock`).  Imports host and config, nothing of control.
"""

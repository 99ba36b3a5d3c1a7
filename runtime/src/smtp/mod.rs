//! Sans-IO ESMTP server engine.

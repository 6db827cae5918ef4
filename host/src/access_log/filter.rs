//! `access_log.filter`: which lines are written (Envoy's status-code, duration,
//! response-flag and runtime-sampling access-log filters, all of them at once;
//! nginx's `access_log ... if=`). A line that does not pass is neither
//! formatted nor buffered.

use super::format::response_flag;
use super::Line;
use crate::config::AccessLogFilter;

/// A line passes when every condition of `f` holds.
pub fn admits(f: &AccessLogFilter, line: &Line<'_>) -> bool {
    if !f.statuses.is_empty() && !f.statuses.iter().any(|r| r.contains(line.status)) {
        return false;
    }
    if let Some(min) = &f.min_duration {
        if line.duration_ms < min.get().as_secs_f64() * 1000.0 {
            return false;
        }
    }
    if let Some(wanted) = &f.response_flags {
        let tcp = line.protocol.as_deref() == Some("TCP");
        let Some(flag) = line.cause.and_then(|c| response_flag(c, tcp)) else {
            return false;
        };
        if !wanted.is_empty() && !wanted.iter().any(|w| w == flag) {
            return false;
        }
    }
    // Drawn last, so the share is of the lines the other conditions let by.
    f.percent.draw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dur, Percent, StatusRange};

    fn filter() -> AccessLogFilter {
        AccessLogFilter {
            statuses: Vec::new(),
            min_duration: None,
            response_flags: None,
            percent: Percent(100.0),
        }
    }

    fn line(status: u16, cause: Option<&'static str>, duration_ms: f64) -> Line<'static> {
        Line {
            status,
            cause,
            duration_ms,
            method: Some("GET"),
            protocol: Some("HTTP/1.1".into()),
            ..Line::blank()
        }
    }

    #[test]
    fn every_condition_must_hold() {
        assert!(admits(&filter(), &line(200, None, 1.0)));
        let f = AccessLogFilter {
            statuses: vec![
                StatusRange { lo: 500, hi: 599 },
                StatusRange { lo: 404, hi: 404 },
            ],
            ..filter()
        };
        assert!(admits(&f, &line(503, None, 1.0)));
        assert!(admits(&f, &line(404, None, 1.0)));
        assert!(!admits(&f, &line(200, None, 1.0)));
        let f = AccessLogFilter {
            min_duration: Some(Dur(std::time::Duration::from_millis(500))),
            ..filter()
        };
        assert!(admits(&f, &line(200, None, 500.0)));
        assert!(!admits(&f, &line(200, None, 499.9)));
        // `[]`: any flag; a list: one of them.
        let any = AccessLogFilter {
            response_flags: Some(Vec::new()),
            ..filter()
        };
        assert!(admits(&any, &line(503, Some("no_healthy_upstream"), 1.0)));
        assert!(!admits(&any, &line(401, Some("plugin:unauthorized"), 1.0)));
        assert!(!admits(&any, &line(200, None, 1.0)));
        let uf = AccessLogFilter {
            response_flags: Some(vec!["UF".into(), "UO".into()]),
            statuses: vec![StatusRange { lo: 500, hi: 599 }],
            ..filter()
        };
        assert!(admits(
            &uf,
            &line(503, Some("upstream_connect_failure"), 1.0)
        ));
        assert!(!admits(&uf, &line(503, Some("no_healthy_upstream"), 1.0)));
        assert!(!admits(
            &uf,
            &line(404, Some("upstream_connect_failure"), 1.0)
        ));
    }

    #[test]
    fn a_share_of_lines_is_sampled() {
        let none = AccessLogFilter {
            percent: Percent(0.0),
            ..filter()
        };
        assert!((0..1000).all(|_| !admits(&none, &line(200, None, 1.0))));
        let half = AccessLogFilter {
            percent: Percent(50.0),
            ..filter()
        };
        let n = (0..10_000)
            .filter(|_| admits(&half, &line(200, None, 1.0)))
            .count();
        // Binomial(10 000, 0.5): 4 000..6 000 is 20 standard deviations wide.
        assert!((4_000..6_000).contains(&n), "{n}");
    }
}

//! Traffic-shift strategies: instant, canary steps, linear steps, and presets named after CodeDeploy's.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration;

/// How long a step holds before the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// Hold for this long (analysis runs throughout), then go on.
    For(#[serde(with = "millis")] Duration),
    /// Hold until `bluegreen promote` (analysis runs throughout).
    UntilPromoted,
}

// By hand: the derive cannot say that `for` is a number of milliseconds, not a `Duration`.
impl utoipa::PartialSchema for Hold {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, SchemaType, Type};
        let hold_for = ObjectBuilder::new()
            .property(
                "for",
                ObjectBuilder::new()
                    .schema_type(SchemaType::Type(Type::Integer))
                    .minimum(Some(0))
                    .description(Some("Milliseconds")),
            )
            .required("for");
        let until_promoted = ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .enum_values(Some(["until_promoted"]));
        OneOfBuilder::new()
            .description(Some(
                "How long the step holds: `{\"for\": ms}`, or `\"until_promoted\"`",
            ))
            .item(hold_for)
            .item(until_promoted)
            .into()
    }
}

impl utoipa::ToSchema for Hold {}

/// One step of a shift: this percent of traffic to the new color, held this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Step {
    pub percent: u8,
    pub hold: Hold,
}

/// The steps of a shift, ending at 100 %. `instant` is the one step `100 %`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Strategy {
    pub name: String,
    pub steps: Vec<Step>,
}

const PRESETS_HINT: &str = "instant (all-at-once), canary, linear, canary-P-D (e.g. canary-10-5m), linear-P-every-D (e.g. linear-10-every-1m), or a name under strategies:";

impl Strategy {
    pub fn instant() -> Strategy {
        Strategy {
            name: "instant".into(),
            steps: vec![Step {
                percent: 100,
                hold: Hold::For(Duration::ZERO),
            }],
        }
    }

    /// Canary: each percent held for `hold`, then 100 %.
    pub fn canary(name: &str, percents: &[u8], hold: Hold) -> Result<Strategy, String> {
        let mut steps = Vec::new();
        let mut last = 0;
        for &percent in percents {
            if percent == 0 || percent > 100 {
                return Err(format!(
                    "step {percent} is out of range; give percents from 1 to 100"
                ));
            }
            if percent <= last {
                return Err(format!(
                    "steps must rise: {percent} after {last}; e.g. [10, 50]"
                ));
            }
            last = percent;
            if percent < 100 {
                steps.push(Step { percent, hold });
            }
        }
        steps.push(Step {
            percent: 100,
            hold: Hold::For(Duration::ZERO),
        });
        Ok(Strategy {
            name: name.into(),
            steps,
        })
    }

    /// Linear: `percent` more every `every` until 100 %.
    pub fn linear(name: &str, percent: u8, every: Hold) -> Result<Strategy, String> {
        if percent == 0 || percent >= 100 {
            return Err(format!(
                "step {percent} is out of range; give a percent from 1 to 99"
            ));
        }
        let percents: Vec<u8> = (1..)
            .map(|i| (i * percent as u32).min(100) as u8)
            .take_while(|p| *p < 100)
            .collect();
        Strategy::canary(name, &percents, every)
    }

    /// The built-in names: `instant`/`all-at-once`, `canary` (10 % for 1 m), `linear` (10 % every
    /// 30 s), `canary-P-D` and `linear-P-every-D` with any percent and duration.
    pub fn preset(name: &str) -> Result<Strategy, String> {
        let bad = |why: String| format!("unknown strategy {name:?}: {why}; use {PRESETS_HINT}");
        let parse_duration = |text: &str| {
            duration::parse(text)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| bad(format!("{text:?} is not a duration like 5m")))
        };
        let parse_percent = |text: &str| {
            text.parse::<u8>()
                .ok()
                .filter(|p| (1..100).contains(p))
                .ok_or_else(|| bad(format!("{text:?} is not a percent from 1 to 99")))
        };
        match name {
            "instant" | "all-at-once" => return Ok(Strategy::instant()),
            "canary" => return Strategy::canary(name, &[10], Hold::For(Duration::from_secs(60))),
            "linear" => return Strategy::linear(name, 10, Hold::For(Duration::from_secs(30))),
            _ => {}
        }
        let parts: Vec<&str> = name.split('-').collect();
        match parts.as_slice() {
            ["canary", percent, wait] => Strategy::canary(
                name,
                &[parse_percent(percent)?],
                Hold::For(parse_duration(wait)?),
            ),
            ["linear", percent, "every", every] => Strategy::linear(
                name,
                parse_percent(percent)?,
                Hold::For(parse_duration(every)?),
            ),
            _ => Err(bad("not a preset".into())),
        }
    }

    /// Total planned hold time, not counting steps that wait for promotion.
    pub fn planned(&self) -> Duration {
        self.steps
            .iter()
            .map(|s| match s.hold {
                Hold::For(d) => d,
                Hold::UntilPromoted => Duration::ZERO,
            })
            .sum()
    }

    /// `10% 5m → 100%`, for people.
    pub fn describe(&self) -> String {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|s| match s.hold {
                Hold::For(d) if d.is_zero() => format!("{}%", s.percent),
                Hold::For(d) => format!("{}% {}", s.percent, duration::format(d)),
                Hold::UntilPromoted => format!("{}% until promoted", s.percent),
            })
            .collect();
        format!("{} ({})", self.name, steps.join(" → "))
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn percents(s: &Strategy) -> Vec<u8> {
        s.steps.iter().map(|s| s.percent).collect()
    }

    #[test]
    fn codedeploy_presets_expand_to_steps() {
        let canary = Strategy::preset("canary-10-5m").unwrap();
        assert_eq!(percents(&canary), [10, 100]);
        assert_eq!(canary.steps[0].hold, Hold::For(Duration::from_secs(300)));
        let linear = Strategy::preset("linear-10-every-1m").unwrap();
        assert_eq!(percents(&linear), [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
        assert_eq!(linear.planned(), Duration::from_secs(540));
        let odd = Strategy::preset("linear-30-every-10s").unwrap();
        assert_eq!(percents(&odd), [30, 60, 90, 100]);
        assert_eq!(percents(&Strategy::preset("all-at-once").unwrap()), [100]);
    }

    #[test]
    fn bad_names_and_steps_say_what_to_use() {
        let e = Strategy::preset("canary-200-5m").unwrap_err();
        assert!(
            e.contains("not a percent") && e.contains("canary-10-5m"),
            "{e}"
        );
        let e = Strategy::preset("bluegreen").unwrap_err();
        assert!(e.contains("unknown strategy \"bluegreen\""), "{e}");
        let e = Strategy::canary("x", &[50, 10], Hold::UntilPromoted).unwrap_err();
        assert!(e.contains("must rise"), "{e}");
    }

    #[test]
    fn describe_reads_like_the_plan() {
        let s = Strategy::canary("careful", &[10, 50], Hold::UntilPromoted).unwrap();
        assert_eq!(
            s.describe(),
            "careful (10% until promoted → 50% until promoted → 100%)"
        );
    }
}

//! What one part of the test matrix counted: shared by the matrix (`matrix.rs`) and the package test (`debtest.rs`).

/// What one part of the matrix counted.
#[derive(Debug, Clone)]
pub struct PartResult {
    pub name: String,
    pub passed: u64,
    pub failed: u64,
    /// Why the part failed beyond its failed tests (guest killed, no result, ...).
    pub problem: Option<String>,
    /// Passed on a second run after the emulator spoiled the first; `problem`
    /// says how, for the line, without failing the part.
    pub retried: bool,
}

impl PartResult {
    pub fn broken(name: &str, problem: String) -> Self {
        Self { name: name.to_string(), passed: 0, failed: 1, problem: Some(problem), retried: false }
    }

    pub fn ok(&self) -> bool {
        self.failed == 0 && (self.problem.is_none() || self.retried)
    }

    pub fn line(&self) -> String {
        let problem = self.problem.as_ref().map(|p| format!(" ({p})")).unwrap_or_default();
        format!("kernel {}: {} passed, {} failed{problem}", self.name, self.passed, self.failed)
    }
}
